"""A model's own Jinja chat template: render conversations and find which characters the assistant wrote.

Templates run in Jinja's immutable sandbox (as `transformers` does): they ship with downloaded model files
and must not reach Python internals. The variables given are the ones HF templates use: `messages`,
`add_generation_prompt`, `bos_token`, `eos_token`, `raise_exception` and `strftime_now`.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cybertron.errors import DataError

Message = dict[str, str]


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
        raise DataError(f"the model's chat template is not valid Jinja: {err}") from err


def render(template: str, messages: Sequence[Message], add_generation_prompt: bool, bos_token: str = "",
           eos_token: str = "") -> str:
    try:
        return compile_template(template).render(messages=list(messages), add_generation_prompt=add_generation_prompt,
                                                 bos_token=bos_token, eos_token=eos_token)
    except jinja2.TemplateError as err:
        raise DataError(f"the model's chat template rejected a conversation: {err}") from err


def render_with_assistant_spans(template: str, messages: Sequence[Message], bos_token: str = "",
                                eos_token: str = "") -> tuple[str, list[tuple[int, int]]]:
    """(full text, [(start, end) character spans written by the assistant]).

    A reply's span is what rendering the conversation up to and including the reply adds to rendering it
    up to the reply with a generation prompt: the content plus the template's end-of-turn marker, which the
    model must learn to emit to stop. This relies on renders being prefixes of each other, which holds for
    the chat templates of the Llama, Qwen and Mistral families; a template where it does not is reported.
    """
    full = render(template, messages, False, bos_token, eos_token)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(template, messages[:i], True, bos_token, eos_token)
        upto = render(template, messages[:i + 1], False, bos_token, eos_token)
        if not (upto.startswith(before) and full.startswith(upto)):
            raise DataError("the model's chat template does not render a conversation as a prefix of its "
                            "continuation, so assistant tokens cannot be located; use a template that does")
        if len(upto) > len(before):
            spans.append((len(before), len(upto)))
    return full, spans
