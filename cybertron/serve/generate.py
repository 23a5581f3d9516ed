"""Text in, streamed text out: the library call behind `cybertron generate`."""

from __future__ import annotations

from collections.abc import Iterator

from cybertron.data.tokenizer import TextTokenizer
from cybertron.models.llama import Transformer
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams
from cybertron.serve.speculative import SpeculativeConfig


def single_request_engine(model: Transformer, tokenizer: TextTokenizer,
                          speculative: SpeculativeConfig | None = None, **options) -> Engine:
    """An engine sized for one sequence of the model's full context (what a one-off generation needs);
    `options` go to the Engine (a tensor-parallel rank's KV heads, say)."""
    block_size = 16
    num_blocks = -(-model.config.max_seq_len // block_size)
    return Engine(model, tokenizer, max_batch_size=1, num_blocks=num_blocks, block_size=block_size,
                  speculative=speculative, **options)


def prompt_ids(tokenizer: TextTokenizer, prompt: str) -> list[int]:
    """The prompt's ids; an empty prompt starts from the beginning-of-text token (bos, else eos, which
    separates documents in our training data), i.e. unconditional generation."""
    ids = tokenizer.encode(prompt)
    if not ids:
        ids = [tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id]
    return ids


def generate_stream(engine_or_model: Engine | Transformer, tokenizer: TextTokenizer, prompt: str,
                    params: SamplingParams) -> Iterator[str]:
    """Yield text pieces as they are generated (stop strings cut, special tokens dropped). Passing a model
    builds a one-request engine; passing an engine shares it with whatever else it is running."""
    engine = engine_or_model if isinstance(engine_or_model, Engine) else \
        single_request_engine(engine_or_model, tokenizer)
    for output in engine.stream(prompt_ids(tokenizer, prompt), params):
        if output.text:
            yield output.text
