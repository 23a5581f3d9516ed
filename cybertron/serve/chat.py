"""Chat messages -> prompt text, with the tokenizer's Jinja chat template when it has one.

Rendering is the same sandboxed code SFT uses (cybertron/data/chat_template.py), so a fine-tuned model is
prompted exactly as it was trained. Without a template, the fallback format is, for each message,

    <|{role}|>\n{content}\n

followed by `<|assistant|>\n` to ask for the reply. It is simple and unambiguous rather than a standard:
a base model has learned no chat format, and one fine-tuned with cybertron's SFT uses its own template.
"""

from __future__ import annotations

from collections.abc import Sequence

from cybertron.data.chat_template import render
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import DataError, UserError


class ChatTemplateError(UserError):
    """The messages cannot be rendered by the model's chat template (the template rejected them)."""


def render_chat(tokenizer: TextTokenizer, messages: Sequence[dict[str, str]]) -> str:
    """The prompt text for `messages` (dicts with role and content), ending where the assistant replies."""
    if tokenizer.chat_template is None:
        return "".join(f"<|{m['role']}|>\n{m['content']}\n" for m in messages) + "<|assistant|>\n"
    try:
        return render(tokenizer.chat_template, messages, add_generation_prompt=True,
                      bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token)
    except DataError as err:
        raise ChatTemplateError(str(err)) from err
