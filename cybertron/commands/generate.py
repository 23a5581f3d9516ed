"""`cybertron generate`: stream a completion of --prompt from a run directory or a Hugging Face model.

    cybertron generate --model RUN_OR_HF_DIR --prompt "def fib(n):" [--max-new-tokens N] [--temperature T]
    cybertron generate --run RUN_DIR --prompt "..." [--greedy] [--stop "\\n"] [--config generate.toml]
    cybertron generate --model DIR --prompt "..." --tp 2     (the model sharded over 2 local ranks)
    cybertron generate --model DIR --prompt "..." --speculative ngram|draft [--spec-k K] [--draft-model DIR]

With --tp N every rank runs the same generation on its shard (same prompt, same seed); rank 0 prints it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from cybertron.config import help_text, opt, parse_args, raise_first_failure
from cybertron.errors import UserError
from cybertron.models.config import ModelConfig
from cybertron.parallel.runtime import DistEnv
from cybertron.parallel.world import World
from cybertron.runs import load_for_inference, read_base
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
from cybertron.serve.sampling import SamplingParams
from cybertron.serve.tensor_parallel import (
    TensorParallelSection,
    check_tp_degree,
    check_tp_devices,
    check_tp_section,
    launch_ranks,
    needs_launch,
    rank_engine_options,
    run_on_ranks,
    shard_model,
)


@dataclass
class PromptSection:
    prompt: str | None = opt(None, "text to continue ('' = unconditional; backslash escapes are kept as typed)")


@dataclass
class GenerateConfig:
    model: ModelSourceSection = field(default_factory=ModelSourceSection)
    generate: PromptSection = field(default_factory=PromptSection)
    sampling: SamplingSection = field(default_factory=SamplingSection)
    parallel: TensorParallelSection = field(default_factory=TensorParallelSection)
    speculative: SpeculativeSection = field(default_factory=SpeculativeSection)


SHORTCUTS = {**MODEL_SHORTCUTS, "--prompt": "generate.prompt", "--max-new-tokens": "sampling.max_new_tokens",
             "--temperature": "sampling.temperature", "--top-k": "sampling.top_k", "--top-p": "sampling.top_p",
             "--seed": "sampling.seed", "--stop": "sampling.stop", "--greedy": "sampling.greedy",
             "--presence-penalty": "sampling.presence_penalty", "--frequency-penalty": "sampling.frequency_penalty",
             "--tp": "parallel.tp", **SPECULATIVE_SHORTCUTS}


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text(GenerateConfig(), "generate", SHORTCUTS))
        return 0
    cfg = parse_args(argv, GenerateConfig(), SHORTCUTS, OUT_IS_NOT_AN_INPUT)
    raise_first_failure([(cfg.generate.prompt is not None, "generate.prompt (--prompt TEXT) is required; "
                                                           "--prompt '' samples unconditionally")])
    params = cfg.sampling.params()  # bad values fail before a model is loaded
    check_tp_section(cfg.parallel)
    cfg.speculative.validate()
    if cfg.parallel.tp > 1 and cfg.speculative.method != "off":
        raise UserError("--speculative cannot be combined with --tp yet; use one or the other")
    device = validate_source(cfg.model)
    env = DistEnv.from_environ()  # torchrun's variables, read once here
    if cfg.parallel.tp > 1:  # from the model's config alone, before any rank starts or loads weights
        model_cfg, tokenizer = read_base(cfg.model.source()[0])
        check_tp_degree(model_cfg, cfg.parallel.tp)
        check_length(model_cfg, tokenizer, cfg.generate.prompt, params)
    if needs_launch(cfg.parallel.tp, env):
        check_tp_devices(device, cfg.parallel.tp)
        return launch_ranks(cfg.parallel.tp, argv, "generate")
    if env.world_size > 1:
        run_on_ranks(env, cfg.parallel.tp, device, cfg.parallel.timeout_s, lambda world: generate_rank(cfg, world))
        return 0
    model, tokenizer, _ = load_for_inference(*cfg.model.source(), device=device, dtype=cfg.model.dtype)
    check_length(model.config, tokenizer, cfg.generate.prompt, params)
    engine = single_request_engine(model, tokenizer, cfg.speculative.build(
        lambda path: load_for_inference(path, False, device=device, dtype=cfg.model.dtype)[0]))
    write_stream(generate_stream(engine, tokenizer, cfg.generate.prompt, params))
    return 0


def generate_rank(cfg: GenerateConfig, world: World) -> None:
    """One rank of `generate --tp N`: the same generation on this rank's shard; only rank 0 prints it (main has
    checked the model's shape and the prompt's length)."""
    params = cfg.sampling.params()
    model, tokenizer, _ = load_for_inference(*cfg.model.source(), device=world.device, dtype=cfg.model.dtype)
    shard_model(model, world.mesh["tp"])
    engine = single_request_engine(model, tokenizer, **rank_engine_options(model, world))
    pieces = generate_stream(engine, tokenizer, cfg.generate.prompt, params)
    if world.is_main:
        write_stream(pieces)
    else:
        for _ in pieces:
            pass


def check_length(cfg: ModelConfig, tokenizer, prompt: str, params: SamplingParams) -> None:
    n = len(prompt_ids(tokenizer, prompt))
    if n + params.max_tokens > cfg.max_seq_len:
        raise UserError(f"--max-new-tokens {params.max_tokens} with a {n}-token prompt exceeds the model's "
                        f"context of {cfg.max_seq_len}; use at most {cfg.max_seq_len - n}")


def write_stream(pieces) -> None:
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()  # stream as it is generated, even through a pipe
    sys.stdout.write("\n")
