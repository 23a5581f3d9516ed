"""Tool calls in the model's own format: learned from its chat template, constrained, parsed and streamed.

A model calls a tool by writing text its chat template defines: Qwen2.5 and Hermes write
`<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, Llama 3.1 a bare `{"name": ...,
"parameters": {...}}`. Rather than a table keyed on model names, the format is read off the template:
ToolCallFormat.detect renders a conversation whose assistant turn holds probe calls and finds, around the
probe's name and arguments, the literal text the template wraps them in. A model whose template renders
no tool calls cannot be offered tools (a 400 naming `tools`).

tool_choice:
- "none": the tools are shown to the model (the template renders them) but its reply is plain content;
- "auto": the reply is free text, but where the template marks calls (<tool_call>) and the grammar
  library is installed, a call the model begins is constrained to its function's schema from the marker
  on (a lazy grammar). A reply holding calls in the template's format, to tools of the request, is
  returned as `message.tool_calls` with finish_reason "tool_calls", the text before them as content.
  Strict functions (OpenAI's strict mode) need that constraint: without the library, or with a bare JSON
  format, they are refused with a 400 rather than left unenforced;
- "required" / a named function: generation is constrained (structured.py) to one call (or several, with
  parallel_tool_calls, where the template has a separator for them), whose arguments follow the
  function's parameters schema, in the template's exact text.

Assistant messages with tool_calls and tool results (role "tool", tool_call_id) in the history are handed
to the template as transformers does, arguments decoded from their JSON string into an object.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from cybertron.data.chat_template import ChatTemplateError, render
from cybertron.data.tokenizer import TextTokenizer
from cybertron.serve.engine import RequestOutput
from cybertron.serve.protocol import ChatFormat
from cybertron.serve.sampling import InvalidParameter
from cybertron.serve.structured import schema_text

PROBE_ARGUMENTS = {"cybertron_probe_argument": "cybertron_probe_value"}
PROBE_NAMES = ("cybertron_probe_first", "cybertron_probe_second")
PROBE_TEXT = "cybertron probe reply"
PROBE_TOOL = {"type": "function", "function": {"name": PROBE_NAMES[0], "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


@dataclass(frozen=True)
class ToolCallFormat:
    """How the template writes a call: begin + head + NAME + middle + ARGUMENTS + tail + end, calls
    joined by `separator` (None where the template writes one call per reply)."""

    begin: str  # e.g. "<tool_call>\n"
    head: str  # the call's JSON up to the name, e.g. '{"name": "'
    middle: str  # between the name and the arguments, e.g. '", "arguments": '
    tail: str  # after the arguments, e.g. "}"
    end: str  # e.g. "\n</tool_call>"
    separator: str | None
    name_key: str  # the JSON keys of the name and the arguments ("arguments", or "parameters")
    arguments_key: str

    @staticmethod
    def detect(tokenizer: TextTokenizer) -> ToolCallFormat:
        """The format of the tokenizer's chat template; InvalidParameter("tools") if it renders no calls."""
        return _detect(tokenizer.chat_template or "", tokenizer.bos_token or "", tokenizer.eos_token)

    def call_text(self, name: str, arguments: str) -> str:
        return f"{self.begin}{self.head}{name}{self.middle}{arguments}{self.tail}{self.end}"

    @property
    def marker(self) -> str:
        """What opens every call (e.g. "<tool_call>"); empty for a bare JSON call."""
        return self.begin.strip()

    def grammar(self, tools: list[dict[str, Any]], several: bool) -> str:
        """Lark (llguidance's dialect) for a reply that is only calls to `tools` (dicts with name and
        parameters), one or, if `several` and the template allows, more."""
        lines = ["start: call" + (f" ({json.dumps(self.separator)} call)*" if several and self.separator
                                  is not None else ""),
                 "call: " + " | ".join(f"call_{i}" for i in range(len(tools)))]
        return "\n".join(lines + self._call_rules(tools, self.begin)) + "\n"

    def lazy_grammar(self, tools: list[dict[str, Any]], several: bool) -> str:
        """Lark for a free reply in which every call, from the moment its marker is written, follows its
        function's schema (a lazy lexeme: text up to the first marker). Needs a marker."""
        marker = self.marker
        assert marker, "a bare JSON call has no marker to start a call from"
        lines = ["%llguidance {}", "start: " + ("call*" if several else "call?") + " TEXT", r"TEXT: /(.|\n)*/",
                 f"trigger[lazy]: TEXT {json.dumps(marker)}",
                 "call: trigger (" + " | ".join(f"call_{i}" for i in range(len(tools))) + ")"]
        return "\n".join(lines + self._call_rules(tools, self.begin[self.begin.index(marker) + len(marker):])) + "\n"

    def _call_rules(self, tools: list[dict[str, Any]], begin: str) -> list[str]:
        lines = []
        for i, tool in enumerate(tools):
            opening = json.dumps(begin + self.head + tool["name"] + self.middle)
            closing = self.tail + self.end
            lines.append(f"call_{i}: {opening} arguments_{i}" + (f" {json.dumps(closing)}" if closing else ""))
            lines.append(f"arguments_{i}: %json {schema_text(parameters_schema(tool))}")
        return lines

    def parse(self, text: str, names: set[str], limit: int | None = None) -> tuple[int, int, list[dict[str, Any]]]:
        """(first, last, calls): the calls in `text` to functions in `names`, which span text[first:last].
        Calls follow each other from the first, at most `limit`; one whose JSON does not parse, or that
        names another function, ends them, and it stays in the content with what follows. No calls: (len,
        len, [])."""
        marker, decoder = self.marker, json.JSONDecoder()
        first = text.find(marker) if marker else _skip_space(text, 0)
        calls: list[dict[str, Any]] = []
        position = first
        while 0 <= position < len(text) and text.startswith(marker, position) and len(calls) != limit:
            start = _skip_space(text, position + len(marker))
            try:
                value, stop = decoder.raw_decode(text, start)
            except json.JSONDecodeError:
                break
            arguments = value.get(self.arguments_key, {}) if isinstance(value, dict) else None
            name = value.get(self.name_key) if isinstance(value, dict) else None
            if not (isinstance(arguments, dict) and isinstance(name, str) and name in names):  # {"name": {}}
                break
            calls.append(new_call(value[self.name_key], arguments))
            position = _skip_separators(text, stop, self.end.strip(), (self.separator or "").strip())
        if not calls:
            return len(text), len(text), []
        return first, max(position, first), calls


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position].isspace():
        position += 1
    return position


def _skip_separators(text: str, position: int, *pieces: str) -> int:
    position = _skip_space(text, position)
    for piece in pieces:
        if piece and text.startswith(piece, position):
            position = _skip_space(text, position + len(piece))
    return position


def new_call(name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """An OpenAI tool call: arguments as a JSON string, an id the client echoes back with the result."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def parameters_schema(tool: dict[str, Any]) -> dict[str, Any]:
    """The function's parameters schema; a function without one takes no arguments (as OpenAI reads it)."""
    return tool.get("parameters") or {"type": "object", "properties": {}, "additionalProperties": False}


@lru_cache(maxsize=16)
def _detect(template: str, bos: str, eos: str) -> ToolCallFormat:
    unsupported = InvalidParameter("tools", "this model's chat template does not render tool calls, so the "
                                   "model cannot be offered tools; leave tools out", code="unsupported_parameter")
    if not template:
        raise unsupported
    user = [{"role": "user", "content": "probe"}]

    def reply(assistant: dict[str, Any]) -> str:
        """What the template adds for the assistant turn, after the generation prompt."""
        try:
            before = render(template, user, True, bos, eos, tools=[PROBE_TOOL])
            after = render(template, [*user, assistant], False, bos, eos, tools=[PROBE_TOOL])
        except ChatTemplateError as err:
            raise InvalidParameter("tools", f"this model's chat template fails on tool calls ({err}), so the "
                                   "model cannot be offered tools; leave tools out",
                                   code="unsupported_parameter") from None
        if not after.startswith(before):
            raise unsupported
        return after[len(before):]

    def calls(*names: str) -> dict[str, Any]:
        return {"role": "assistant", "content": "", "tool_calls": [
            {"id": f"call_{i}", "type": "function", "function": {"name": name, "arguments": PROBE_ARGUMENTS}}
            for i, name in enumerate(names)]}

    plain = reply({"role": "assistant", "content": PROBE_TEXT})
    end_of_turn = plain[plain.index(PROBE_TEXT) + len(PROBE_TEXT):] if PROBE_TEXT in plain else ""
    one = reply(calls(PROBE_NAMES[0])).removesuffix(end_of_turn)
    fmt = _locate(one, unsupported)
    try:
        two = reply(calls(*PROBE_NAMES)).removesuffix(end_of_turn)
    except InvalidParameter:  # a template may refuse several calls in one reply (Llama 3.1's does)
        two = ""
    first, second = (fmt.call_text(name, json.dumps(PROBE_ARGUMENTS)) for name in PROBE_NAMES)
    separator = two[len(first):len(two) - len(second)] if (
        two.startswith(first) and two.endswith(second) and len(two) >= len(first) + len(second)) else None
    return ToolCallFormat(fmt.begin, fmt.head, fmt.middle, fmt.tail, fmt.end, separator, fmt.name_key,
                          fmt.arguments_key)


def _locate(text: str, unsupported: InvalidParameter) -> ToolCallFormat:
    """Split a reply holding one probe call into the template's literal pieces."""
    name, arguments = PROBE_NAMES[0], json.dumps(PROBE_ARGUMENTS, ensure_ascii=False)
    at_name, at_arguments = text.find(name), text.find(arguments)
    if at_name < 0 or at_arguments < at_name:
        raise unsupported
    decoder = json.JSONDecoder()
    for start in (i for i in range(at_name, -1, -1) if text[i] == "{"):
        try:
            value, stop = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        items = value.items() if isinstance(value, dict) else ()
        name_key = next((k for k, v in items if v == name), None)
        arguments_key = next((k for k, v in items if v == PROBE_ARGUMENTS), None)
        if stop > at_arguments and name_key and arguments_key:
            return ToolCallFormat(text[:start], text[start:at_name], text[at_name + len(name):at_arguments],
                                  text[at_arguments + len(arguments):stop], text[stop:], None, name_key,
                                  arguments_key)
    raise unsupported


@dataclass(frozen=True)
class ToolUse:
    """What a request's tools and tool_choice ask of generation and of the reply."""

    format: ToolCallFormat
    functions: tuple[dict[str, Any], ...]  # OpenAI function definitions (name, description, parameters)
    choice: str  # "auto", "required", or the name of the function to call
    parallel: bool

    @property
    def constrained(self) -> bool:
        """The reply is calls only."""
        return self.choice != "auto"

    @property
    def strict(self) -> bool:
        """Some function asks for arguments that always follow its schema (OpenAI's strict mode)."""
        return any(f.get("strict") for f in self.functions)

    def grammar(self) -> str | None:
        """The Lark grammar of the reply: calls only (required, named); for "auto", free text in which each
        call follows its schema once begun. None for "auto" where calls have no marker to begin with."""
        if self.choice == "required":
            return self.format.grammar(list(self.functions), several=self.parallel)
        if self.choice != "auto":
            return self.format.grammar([f for f in self.functions if f["name"] == self.choice], several=False)
        return self.format.lazy_grammar(list(self.functions), self.parallel) if self.format.marker else None

    def find(self, text: str) -> tuple[int, int, list[dict[str, Any]]]:
        """(first, last, calls) of a finished reply: its calls, which span text[first:last]."""
        return self.format.parse(text, {f["name"] for f in self.functions}, None if self.parallel else 1)

    def shown(self, text: str) -> int:
        """How much of a reply in progress can be streamed as content: not what may become a call."""
        if self.constrained:
            return 0
        marker = self.format.marker
        if not marker:  # a bare JSON call: a reply starting with "{" is held back whole
            stripped = text.lstrip()
            return 0 if not stripped or stripped.startswith("{") else len(text)
        found = text.find(marker)
        if found >= 0:
            return found
        partial = next((k for k in range(min(len(marker) - 1, len(text)), 0, -1) if text.endswith(marker[:k])), 0)
        return len(text) - partial


def tool_use(tokenizer: TextTokenizer, functions: list[dict[str, Any]], choice: str | dict[str, Any] | None,
             parallel: bool | None) -> ToolUse | None:
    """How the reply deals with tools; None where it is plain text (no tools, or tool_choice "none").
    InvalidParameter for a choice the tools cannot meet or a template without tool calls."""
    name = choice["function"]["name"] if isinstance(choice, dict) else None
    choice = name or choice or ("auto" if functions else "none")
    if not functions:
        if choice not in ("none", "auto"):
            raise InvalidParameter("tool_choice", f"tool_choice {choice!r} needs tools; give tools or leave "
                                   "tool_choice out")
        return None
    names = [f["name"] for f in functions]
    if len(set(names)) < len(names):
        raise InvalidParameter("tools", "tools must have distinct function names")
    if name is not None and name not in names:
        raise InvalidParameter("tool_choice", f"tool_choice names the function {name!r}, which is not among "
                               f"the tools ({', '.join(names)})")
    if choice == "none":
        return None
    return ToolUse(ToolCallFormat.detect(tokenizer), tuple(functions), choice, parallel is not False)


class ToolChatFormat(ChatFormat):
    """Chat choices whose replies may hold tool calls: `message.tool_calls` with finish_reason "tool_calls".
    Streaming, content goes out as it comes until a call may begin; the calls follow at the end, each whole
    in one delta (OpenAI streams the arguments in pieces; clients accumulate either the same way)."""

    def __init__(self, tokenizer: TextTokenizer, logprobs: bool, use: ToolUse):
        super().__init__(tokenizer, logprobs)
        self.use = use
        self._text: dict[int, str] = {}
        self._sent: dict[int, int] = {}  # characters of the reply streamed as content

    def chunk(self, index: int, out: RequestOutput) -> dict[str, Any] | None:
        text = self._text[index] = self._text.get(index, "") + out.text
        sent = self._sent.get(index, 0)
        chunk = super().chunk(index, out)
        if not out.finished:
            shown = max(sent, self.use.shown(text))
            self._sent[index] = shown
            chunk["delta"] = {"content": text[sent:shown]} if shown > sent else {}
            return chunk if chunk["delta"] or chunk["logprobs"] else None
        first, last, calls = self.use.find(text) if out.finish_reason == "stop" else (0, 0, [])
        if not calls:
            chunk["delta"] = {"content": text[sent:]} if len(text) > sent else {}
            return chunk
        rest = text[sent:first].rstrip() + text[last:]
        chunk["delta"] = {**({"content": rest} if rest.strip() else {}),
                          "tool_calls": [{"index": i, **call} for i, call in enumerate(calls)]}
        chunk["finish_reason"] = "tool_calls"
        return chunk

    def choice(self, index: int, outs: list[RequestOutput]) -> dict[str, Any]:
        choice = super().choice(index, outs)
        if choice["finish_reason"] != "stop":
            return choice
        text = choice["message"]["content"]
        first, last, calls = self.use.find(text)
        if calls:
            content = (text[:first] + text[last:]).strip() or None
            choice["message"] = {"role": "assistant", "content": content, "tool_calls": calls}
            choice["finish_reason"] = "tool_calls"
        return choice
