"""Which grammar a request asks its reply to follow: response_format (any JSON object, or a JSON schema) or
tools (calls only for tool_choice "required" or a named function; calls checked from their marker on for
"auto"), and the combinations refused with a 400 naming the field rather than half honoured."""

from __future__ import annotations

from cybertron.serve.protocol import ResponseFormat
from cybertron.serve.sampling import InvalidParameter
from cybertron.serve.structured import Grammar, GrammarCompiler, has_library
from cybertron.serve.tools import ToolUse


def request_grammar(compiler: GrammarCompiler, form: ResponseFormat | None, tools: ToolUse | None) -> Grammar | None:
    """The grammar that tool_choice or response_format asks generation to follow; None for free text."""
    json_asked = form is not None and form.type != "text"
    if tools is not None and json_asked:
        raise InvalidParameter("response_format", "response_format cannot be combined with tools unless "
                               "tool_choice is \"none\"; leave one of them out")
    if tools is not None:
        return tool_grammar(compiler, tools)
    if not json_asked:
        return None
    if form.type == "json_object":
        return compiler.json_object("response_format")
    if form.json_schema is None or form.json_schema.schema_ is None:
        raise InvalidParameter("response_format.json_schema", "response_format of type json_schema needs "
                               "json_schema.schema, the JSON schema of the reply")
    return compiler.json_schema(form.json_schema.schema_, "response_format.json_schema.schema")


def tool_grammar(compiler: GrammarCompiler, tools: ToolUse) -> Grammar | None:
    """The grammar of a reply with tools: calls only (required, named), or free text whose calls follow
    their schemas ("auto": where the format marks calls and the library is installed; strict functions
    need it, others are parsed unconstrained without it)."""
    grammar = tools.grammar()
    if grammar is None and tools.strict:
        raise InvalidParameter("tools", "strict functions with tool_choice \"auto\" need a chat template that "
                               "marks where a call begins, and this model's writes bare JSON; use tool_choice "
                               "\"required\" or a named function, or strict: false")
    if grammar is None or not (tools.constrained or tools.strict or has_library()):
        return None
    return compiler.lark(grammar, "tools")
