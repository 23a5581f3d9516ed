"""The config sections `cybertron generate` and `cybertron serve` share — the model source with its device and
dtype, the sampling settings and speculative decoding — each with its validator, and the device they name."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from cybertron.config import DTYPE_NAMES, check_dtype, opt, raise_first_failure
from cybertron.data.escapes import decode_escapes
from cybertron.errors import ConfigError, UserError
from cybertron.models.llama import Transformer
from cybertron.serve.sampling import SamplingParams
from cybertron.serve.speculative import METHODS, SpeculativeConfig

# The model flags both commands take: {flag: key}.
MODEL_SHORTCUTS = {"--model": "model.path", "--run": "model.run", "--device": "model.device",
                   "--dtype": "model.dtype"}
# `--out` is an output directory everywhere (ARCHITECTURE rule 10): a command that only reads names the new flag.
OUT_IS_NOT_AN_INPUT = {"--out": "--out is an output directory; read a run (or a Hugging Face directory) with "
                                "--model PATH (or --run RUN_DIR)"}


@dataclass
class ModelSourceSection:
    path: str = opt("", "a Hugging Face model directory (config.json, safetensors, tokenizer.json), a PEFT "
                        "LoRA/DoRA adapter directory (merged onto its base_model_name_or_path) or a cybertron run "
                        "directory (its newest checkpoint is loaded)")
    run: str = opt("", "a cybertron run directory: the explicit form of model.path for a run")
    device: str = opt("auto", "auto (cuda if available), cpu or cuda[:N]")
    dtype: str = opt("auto", "weights/KV dtype of a Hugging Face model or PEFT adapter: auto (bf16 on CUDA, fp32 "
                             "on CPU), fp32, bf16 or fp16", dtype=True)

    def source(self) -> tuple[Path, bool]:
        """(the directory to load, whether it was given as a run with --run)."""
        return Path(self.run or self.path), bool(self.run)


def model_source_checks(m: ModelSourceSection) -> list[tuple[bool, str]]:
    return [
        (bool(m.path) != bool(m.run), "give one model source: --model PATH (a Hugging Face or run directory) "
                                      "or --run RUN_DIR" + (", not both" if m.path and m.run else "")),
        check_dtype("model.dtype", m.dtype, ("auto", *DTYPE_NAMES)),
    ]


@dataclass
class SamplingSection:
    max_new_tokens: int = opt(200, "tokens to generate at most")
    temperature: float = opt(0.8, "0 = greedy")
    top_k: int = opt(0, "keep the k most likely tokens (0 = off)")
    top_p: float = opt(1.0, "nucleus sampling mass (1.0 = off)")
    seed: int = opt(0, "sampling seed (same seed, same text)")
    stop: list[str] = opt([], "stop before this text (repeat --stop for several; backslash escapes such as \\n "
                              "are decoded)")
    greedy: bool = opt(False, "always take the most likely token (temperature 0)")
    presence_penalty: float = opt(0.0, "subtracted from the logit of each token already generated, in [-2, 2]")
    frequency_penalty: float = opt(0.0, "subtracted from a token's logit once per time it was generated, in "
                                        "[-2, 2]")

    def params(self) -> SamplingParams:
        """The engine's parameters, validated; ConfigError naming the sampling key otherwise."""
        params = SamplingParams(temperature=0.0 if self.greedy else self.temperature, top_k=self.top_k,
                                top_p=self.top_p, max_tokens=self.max_new_tokens,
                                stop=tuple(decode_escapes(s, "sampling.stop") for s in self.stop), seed=self.seed,
                                presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty)
        try:
            params.validate()
        except UserError as err:
            raise ConfigError(f"sampling.{err}") from err
        return params


@dataclass
class SpeculativeSection:
    method: str = opt("off", "speculative decoding: off, ngram (prompt lookup: propose what followed the last "
                             "tokens earlier in the context) or draft (a smaller model, --draft-model)")
    k: int = opt(4, "tokens proposed per step at most")
    ngram_min: int = opt(1, "shortest suffix looked up in the context (ngram)")
    ngram_max: int = opt(3, "longest suffix looked up in the context, tried first (ngram)")
    draft_model: str = opt("", "the draft model (draft): a Hugging Face or cybertron run directory whose "
                               "vocabulary is the target's; loaded on the target's device and dtype")

    def validate(self) -> None:
        """ConfigError naming the first bad value, before any model is loaded."""
        raise_first_failure([
            (self.method in ("off", *METHODS), f"speculative.method must be one of off, {', '.join(METHODS)}, "
                                               f"got {self.method!r}"),
            (self.k >= 1, f"speculative.k must be >= 1, got {self.k}"),
            (1 <= self.ngram_min <= self.ngram_max, f"speculative n-gram sizes need 1 <= ngram_min <= ngram_max, "
                                                    f"got {self.ngram_min} and {self.ngram_max}"),
            (self.method != "draft" or bool(self.draft_model), "--speculative draft needs --draft-model PATH"),
            (self.method == "draft" or not self.draft_model, "--draft-model is only used with --speculative draft"),
            (not self.draft_model or Path(self.draft_model).is_dir(),
             f"--draft-model {self.draft_model} is not a directory; give a Hugging Face model directory or a "
             "cybertron run directory"),
        ])

    def build(self, load_draft: Callable[[Path], Transformer]) -> SpeculativeConfig | None:
        """The engine's config (None when off), with the draft model from `load_draft(path)` if there is one
        (the command loads it: reading a run directory is above this layer)."""
        if self.method == "off":
            return None
        draft = load_draft(Path(self.draft_model)) if self.method == "draft" else None
        return SpeculativeConfig(self.method, k=self.k, ngram_min=self.ngram_min, ngram_max=self.ngram_max,
                                 draft=draft)


# The speculative flags both commands take: {flag: key}.
SPECULATIVE_SHORTCUTS = {"--speculative": "speculative.method", "--spec-k": "speculative.k",
                         "--spec-ngram-min": "speculative.ngram_min", "--spec-ngram-max": "speculative.ngram_max",
                         "--draft-model": "speculative.draft_model"}


def validate_source(m: ModelSourceSection) -> torch.device:
    """Check the model section before any loading; returns the device it names."""
    raise_first_failure(model_source_checks(m))
    return resolve_device(m.device)


def resolve_device(name: str) -> torch.device:
    """auto -> cuda when available else cpu; UserError for an unknown or unavailable device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a device; use auto, cpu or cuda") from err
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name!r} is not supported; use auto, cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for CUDA but torch sees no GPU; use --device cpu")
    return device
