"""`cybertron generate`: stream a completion of --prompt from a run directory or a Hugging Face model.

    cybertron generate --model RUN_OR_HF_DIR --prompt "def fib(n):" [--max-new-tokens N] [--temperature T]
    cybertron generate --run RUN_DIR --prompt "..." [--greedy] [--stop "\\n"] [--config generate.toml]
    cybertron generate --model DIR --prompt "..." --speculative ngram|draft [--spec-k K] [--draft-model DIR]
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from cybertron.config import help_text, opt, parse_args, raise_first_failure
from cybertron.errors import UserError
from cybertron.runs import load_for_inference
from cybertron.serve.generate import generate_stream, prompt_ids, single_request_engine
from cybertron.serve.options import (
    MODEL_SHORTCUTS,
    OUT_IS_NOT_AN_INPUT,
    SPECULATIVE_SHORTCUTS,
    ModelSourceSection,
    SamplingSection,
    SpeculativeSection,
    validate_source,
)


@dataclass
class PromptSection:
    prompt: str | None = opt(None, "text to continue ('' = unconditional; backslash escapes are kept as typed)")


@dataclass
class GenerateConfig:
    model: ModelSourceSection = field(default_factory=ModelSourceSection)
    generate: PromptSection = field(default_factory=PromptSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    speculative: SpeculativeSection = field(default_factory=SpeculativeSection)


SHORTCUTS = {**MODEL_SHORTCUTS, "--prompt": "generate.prompt", "--max-new-tokens": "sampling.max_new_tokens",
             "--temperature": "sampling.temperature", "--top-k": "sampling.top_k", "--top-p": "sampling.top_p",
             "--seed": "sampling.seed", "--stop": "sampling.stop", "--greedy": "sampling.greedy",
             "--presence-penalty": "sampling.presence_penalty", "--frequency-penalty": "sampling.frequency_penalty",
             **SPECULATIVE_SHORTCUTS}


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text(GenerateConfig(), "generate", SHORTCUTS))
        return 0
    cfg = parse_args(argv, GenerateConfig(), SHORTCUTS, OUT_IS_NOT_AN_INPUT)
    raise_first_failure([(cfg.generate.prompt is not None, "generate.prompt (--prompt TEXT) is required; "
                                                           "--prompt '' samples unconditionally")])
    params = cfg.sampling.params()  # bad values fail before a model is loaded
    cfg.speculative.validate()
    device = validate_source(cfg.model)
    model, tokenizer, _ = load_for_inference(*cfg.model.source(), device=device, dtype=cfg.model.dtype)
    engine = single_request_engine(model, tokenizer, cfg.speculative.build(device, cfg.model.dtype))
    prompt = cfg.generate.prompt
    n = len(prompt_ids(tokenizer, prompt))
    if n + params.max_tokens > model.config.max_seq_len:
        raise UserError(f"--max-new-tokens {params.max_tokens} with a {n}-token prompt exceeds the model's "
                        f"context of {model.config.max_seq_len}; use at most {model.config.max_seq_len - n}")
    for piece in generate_stream(engine, tokenizer, prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()  # stream as it is generated, even through a pipe
    sys.stdout.write("\n")
    return 0
