"""Chat messages -> prompt text, with the tokenizer's Jinja chat template when it has one.

Templates run in Jinja's immutable sandbox (as `transformers` does): a template ships with downloaded
model files and must not reach Python internals. The variables given are the ones HF templates use:
`messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and a `raise_exception` helper.

Without a template, the fallback format is, for each message,

    <|{role}|>\\n{content}\\n

followed by `<|assistant|>\\n` to ask for the reply. It is simple and unambiguous rather than a standard:
a base model has learned no chat format, and one fine-tuned with cybertron's SFT uses its own template.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from functools import lru_cache

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import UserError


class ChatTemplateError(UserError):
    """The messages cannot be rendered by the model's chat template (the template rejected them)."""


def render_chat(tokenizer: TextTokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The prompt text for `messages` (dicts with role and content), ending where the assistant replies."""
    if tokenizer.chat_template is None:
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    template = _compile(tokenizer.chat_template)
    try:
        return template.render(messages=list(messages), add_generation_prompt=True,
                               bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token)
    except jinja2.TemplateError as err:
        raise ChatTemplateError(f"the model's chat template rejected the messages: {err}") from err


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


@lru_cache(maxsize=8)
def _compile(source: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = _raise_exception
    env.filters["tojson"] = lambda value, indent=None: json.dumps(value, indent=indent, ensure_ascii=False)
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as err:
        raise ChatTemplateError(f"the model's chat template is not valid Jinja: {err}") from err
