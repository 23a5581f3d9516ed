"""Where GRPO's rewards come from: a user's Python function or a trained reward model, checked sample by sample.

A reward function follows TRL's convention, `f(prompts, completions, **fields) -> list of numbers`: prompts
are the records' `prompt` values (strings or chat messages), completions the generated texts, and every
other field of the prompt records arrives as a keyword argument holding one value per sample (e.g. the
expected `answer`). A function that raises, returns the wrong number of values, or returns something that is
not a finite number stops the run with the step and the offending sample named: a silent zero would train
the policy on a wrong signal.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from cybertron.align.reward import RewardModel, RewardModelScorer
from cybertron.align.user_code import import_file
from cybertron.errors import UserError

# (run directory, device) -> the reward model of a `cybertron align --method reward` run, in eval mode.
RewardModelLoader = Callable[[Path, torch.device], RewardModel]


class RewardError(UserError):
    """The reward source failed on a sample; the message names the step and the sample."""


class RewardSource(Protocol):
    name: str

    def __call__(self, step: int, prompts: list[Any], completions: list[str], fields: list[dict[str, Any]],
                 sequences: list[list[int]]) -> list[float]:
        """One reward per sample; `sequences` are prompt + completion token ids (what a reward model scores)."""
        ...


def _describe(prompt: Any, completion: str) -> str:
    return f"prompt {str(prompt)[:80]!r}, completion {completion[:80]!r}"


class FunctionReward:
    def __init__(self, fn: Callable[..., Any], name: str):
        self.fn = fn
        self.name = name

    def _call(self, prompts: list[Any], completions: list[str], fields: list[dict[str, Any]]) -> Any:
        keys = sorted({k for f in fields for k in f})
        columns = {k: [f.get(k) for f in fields] for k in keys}
        return self.fn(prompts=prompts, completions=completions, **columns)

    def __call__(self, step: int, prompts: list[Any], completions: list[str], fields: list[dict[str, Any]],
                 sequences: list[list[int]]) -> list[float]:
        try:
            values = self._call(prompts, completions, fields)
        except Exception as err:  # noqa: BLE001 - any failure of user code is reported with its sample
            raise self._offender(step, prompts, completions, fields, err) from err
        try:
            values = list(values.tolist() if isinstance(values, torch.Tensor) else values)
        except TypeError as err:
            raise RewardError(f"step {step}: reward function {self.name} returned {type(values).__name__}, not a "
                              f"list of {len(completions)} numbers") from err
        if len(values) != len(completions):
            raise RewardError(f"step {step}: reward function {self.name} returned {len(values)} values for "
                              f"{len(completions)} completions")
        for i, value in enumerate(values):
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
                continue
            shown = f"{value!r}"[:60]
            raise RewardError(f"step {step}: reward function {self.name} returned {shown} "
                              f"({type(value).__name__}) for sample {i} ({_describe(prompts[i], completions[i])}); "
                              "a reward must be a finite number")
        return [float(v) for v in values]

    def _offender(self, step: int, prompts: list[Any], completions: list[str], fields: list[dict[str, Any]],
                  err: Exception) -> RewardError:
        """The batch call raised: call sample by sample to name the one that fails."""
        for i in range(len(completions)):
            try:
                self._call([prompts[i]], [completions[i]], [fields[i]])
            except Exception as sample_err:  # noqa: BLE001
                return RewardError(f"step {step}: reward function {self.name} raised "
                                   f"{type(sample_err).__name__}: {sample_err} on sample {i} "
                                   f"({_describe(prompts[i], completions[i])})")
        return RewardError(f"step {step}: reward function {self.name} raised {type(err).__name__}: {err} on the "
                           f"batch of {len(completions)} samples (each alone succeeds)")


class ModelReward:
    def __init__(self, scorer: Callable[[Sequence[Sequence[int]]], list[float]], name: str):
        self.scorer = scorer
        self.name = name

    def __call__(self, step: int, prompts: list[Any], completions: list[str], fields: list[dict[str, Any]],
                 sequences: list[list[int]]) -> list[float]:
        return self.scorer(sequences)


def load_reward_function(spec: str) -> FunctionReward:
    """FILE.py:FUNCTION -> the function, imported from the file; UserError for anything that does not resolve."""
    path_text, sep, func_name = spec.rpartition(":")
    if not sep or not path_text or not func_name:
        raise UserError(f"align.reward={spec!r}: expected FILE.py:FUNCTION or a reward-model run directory")
    path = Path(path_text)
    module = import_file(path, "align.reward", "cybertron_reward")
    fn = getattr(module, func_name, None)
    if not callable(fn):
        names = sorted(n for n in vars(module) if callable(getattr(module, n)) and not n.startswith("_"))
        raise UserError(f"align.reward: {path} has no function {func_name!r}; it defines {names}")
    return FunctionReward(fn, spec)


def load_reward(spec: str, device: torch.device, reward_model: RewardModelLoader | None = None) -> RewardSource:
    """A reward function (FILE.py:FUNCTION) or a reward-model run directory, which `reward_model` loads (runs.py
    reads run directories: the align command passes its loader, which refuses a run that is no reward model)."""
    if Path(spec).is_dir():
        if reward_model is None:
            raise UserError(f"align.reward: {spec} is a directory; a reward-model run is loaded by `cybertron align`")
        return ModelReward(RewardModelScorer(reward_model(Path(spec), device)), spec)
    return load_reward_function(spec)
