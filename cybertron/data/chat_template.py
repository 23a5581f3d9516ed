"""Jinja chat templates: render conversations, find which characters the assistant wrote, and the one
default format for models that ship no template.

Templates run in Jinja's immutable sandbox (as `transformers` does): they ship with downloaded model files
and must not reach Python internals. The variables given are the ones HF templates use: `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `tools`, `raise_exception` and `strftime_now`.

A model pretrained by `cybertron train` (or any base model) has learned no chat format. Fine-tuning,
alignment and serving then all use DEFAULT_CHAT_TEMPLATE, and a fine-tuning run writes the template it
trained with into its run directory (chat_template.jinja), so export, generate and serve prompt the tuned
model exactly as it was trained.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cybertron.errors import DataError

Message = dict[str, Any]  # role, content and, for tool use, tool_calls / tool_call_id / name

# Each message is `<|role|>\n` + content; an assistant turn ends with the eos token (the end-of-text token a
# pretrained model already emits, so generation stops after a reply), any other turn with a newline. Renders
# of a conversation are prefixes of the renders of its continuations, which render_with_assistant_spans needs.
# The explicit strings keep it independent of Jinja's whitespace options (transformers renders it the same).
DEFAULT_CHAT_TEMPLATE = (
    "{% if bos_token %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% else %}{{ '\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}")
DEFAULT_CHOICE = "default"  # data.chat_template=default: the built-in format even when the model has one
# What a user can do about a template that fails, named in every such error of finetune and align.
REMEDY = ("give a working Jinja template with --data.chat_template FILE, or --data.chat_template=default for "
          "cybertron's built-in chat format")


class ChatTemplateError(DataError):
    """A chat template that is not valid Jinja, rejects a conversation, or hides the assistant's tokens."""


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=8)
def compile_template(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: time.strftime(fmt)
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"the chat template is not valid Jinja: {err}") from err


def render(template: str, messages: Sequence[Message], add_generation_prompt: bool, bos_token: str = "",
           eos_token: str = "", tools: list[dict] | None = None) -> str:
    """`tools`: function definitions in OpenAI's format, for templates that describe them to the model
    (serving; messages may then hold tool_calls and tool results, as transformers passes them)."""
    try:
        return compile_template(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                 bos_token=bos_token, eos_token=eos_token, tools=tools)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"the chat template rejected a conversation: {err}") from err


def render_with_assistant_spans(template: str, messages: Sequence[Message], bos_token: str = "",
                                eos_token: str = "",
                                tools: list[dict] | None = None) -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) character spans written by the assistant]).

    A reply's span is what rendering the conversation up to and including the reply adds to rendering it
    up to the reply with a generation prompt: the content plus the template's end-of-turn marker, which the
    model must learn to emit to stop. This relies on renders being prefixes of each other, which holds for
    the chat templates of the Llama, Qwen and Mistral families; a template where it does not is reported.
    """
    full = render(template, messages, False, bos_token, eos_token, tools)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(template, messages[:i], True, bos_token, eos_token, tools)
        upto = render(template, messages[:i + 1], False, bos_token, eos_token, tools)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise ChatTemplateError("the chat template does not render a conversation as a prefix of its "
                                    "continuation, so assistant tokens cannot be located")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans


@dataclass(frozen=True)
class ChatFormat:
    template: str
    origin: str  # "model", "default" or the path of a data.chat_template file

    def describe(self) -> str:
        if self.origin == "model":
            return "chat format: the model's template"
        if self.origin == "default":
            return "chat format: cybertron's default (<|role|> headers, replies end with eos)"
        return f"chat format: {self.origin}"


def resolve_chat_format(model_template: str | None, choice: str = "") -> ChatFormat:
    """The template fine-tuning renders with: the file `choice` names, the default (choice "default", or a
    model without a template), else the model's own. Checked to be valid Jinja before any slow work."""
    if choice == DEFAULT_CHOICE or (not choice and model_template is None):
        return ChatFormat(DEFAULT_CHAT_TEMPLATE, "default")
    if not choice:
        fmt = ChatFormat(model_template, "model")
    else:
        path = Path(choice)
        if not path.is_file():
            raise ChatTemplateError(f"data.chat_template file {path} does not exist; {REMEDY}")
        try:
            fmt = ChatFormat(path.read_text(encoding="utf-8"), str(path))
        except (OSError, UnicodeDecodeError) as err:
            raise ChatTemplateError(f"data.chat_template file {path} cannot be read ({err}); {REMEDY}") from err
    try:
        compile_template(fmt.template)
    except ChatTemplateError as err:
        owner = "the model's chat template" if fmt.origin == "model" else f"data.chat_template {fmt.origin}"
        raise ChatTemplateError(f"{owner} is not valid Jinja ({err.__cause__}); {REMEDY}") from err
    return fmt


@contextmanager
def remedy_on_failure() -> Iterator[None]:
    """Rendering a data set: a template that fails on it is reported with what the user can do about it."""
    try:
        yield
    except ChatTemplateError as err:
        if REMEDY in str(err):
            raise
        raise ChatTemplateError(f"{err}; {REMEDY}") from err
