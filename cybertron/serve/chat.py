"""Chat messages -> prompt text, with the tokenizer's Jinja chat template, or the default format without one.

Rendering is the same sandboxed code SFT uses (cybertron/data/chat_template.py), so a fine-tuned model is
prompted exactly as it was trained. A model without a template gets DEFAULT_CHAT_TEMPLATE, the format
`cybertron finetune` also trains such a model with: for each message

    <|{role}|>\n{content}\n          (an assistant message ends with the eos token instead of the newline)

followed by `<|assistant|>\n` to ask for the reply, which then ends at the eos token.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cybertron.data.chat_template import DEFAULT_CHAT_TEMPLATE, ChatTemplateError, render
from cybertron.data.tokenizer import TextTokenizer

__all__ = ["ChatTemplateError", "render_chat"]  # ChatTemplateError: the messages cannot be rendered


def render_chat(tokenizer: TextTokenizer, messages: Sequence[dict[str, Any]], tools: list[dict] | None = None) -> str:
    """The prompt text for `messages` (dicts with role and content, tool_calls or tool_call_id where
    tools are in play), ending where the assistant replies; `tools` are described to the model."""
    return render(tokenizer.chat_template or DEFAULT_CHAT_TEMPLATE, messages, add_generation_prompt=True,
                  bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token, tools=tools)
