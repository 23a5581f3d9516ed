"""Batches drawn from several sources in proportion to their weights (data.mix): packed windows of token
streams (`cybertron train`, MixtureLoader) and rows of examples (`finetune` and `align`, RowMixtureLoader).

Global batch b (starting at global sample c) draws the source of each of its G slots from a generator
seeded by (seed, c): a pure function of the position, the same on every rank and in every layout. Source i
then supplies its next samples in its own seeded per-epoch permutation (the PackedLoader / RowLoader rule
over that source alone, seeded seed + 1 + i), so the loader's state is the global sample count plus how many
samples each source has given; a resumed run restores both and sees exactly the batches an uninterrupted
one would.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from cybertron.data.loader import PackedLoader
from cybertron.errors import ConfigError, DataError

_MIX_STREAM = 0x6D6978  # separates the draw of sources from every per-source permutation's generator


@dataclass(frozen=True)
class MixEntry:
    """One [[data.mix]] table: a source, its weight and the per-source keys the command allows."""

    path: str
    weight: float = 1.0
    options: tuple[tuple[str, str], ...] = ()

    def option(self, key: str, default: str) -> str:
        return dict(self.options).get(key, default)


def parse_mix(items: Sequence[dict], extra_keys: Sequence[str] = ()) -> list[MixEntry]:
    """data.mix tables -> MixEntry; ConfigError naming the bad entry. `extra_keys`: what an entry may give
    besides path and weight (train: text_field; finetune: format)."""
    allowed = ", ".join(["weight", *extra_keys])
    entries = []
    for n, item in enumerate(items, start=1):
        unknown = sorted(set(item) - {"path", "weight", *extra_keys})
        if unknown or not item.get("path"):
            raise ConfigError(f"data.mix entry {n} ({item}) needs a path and may give {allowed}"
                              + (f"; unknown {unknown}" if unknown else ""))
        try:
            weight = float(item.get("weight", 1.0))
        except (TypeError, ValueError):
            weight = float("nan")
        if not weight > 0 or weight == float("inf"):
            raise ConfigError(f"data.mix entry {n} ({item['path']}): weight must be a number > 0, "
                              f"got {item.get('weight')!r}")
        options = tuple((k, str(item[k])) for k in extra_keys if k in item)
        entries.append(MixEntry(str(item["path"]), weight, options))
    return entries


def draw_sources(seed: int, samples_consumed: int, probabilities: np.ndarray, global_batch_size: int,
          per_source: list[int]) -> tuple[np.ndarray, np.ndarray]:
    """(source of each global slot, its index in that source's endless shuffled sequence)."""
    rng = np.random.default_rng([seed, _MIX_STREAM, samples_consumed])
    choices = rng.choice(len(probabilities), size=global_batch_size, p=probabilities)
    # Each slot's index within its source: that source's count so far plus its rank among earlier slots.
    slot_in_source = np.empty(len(choices), dtype=np.int64)
    for i in range(len(probabilities)):
        mine = choices == i
        slot_in_source[mine] = per_source[i] + np.arange(int(mine.sum()))
    return choices, slot_in_source


def check_mixture_state(state: dict, n_sources: int, probabilities: np.ndarray) -> None:
    if "per_source" not in state:
        raise DataError("the checkpoint's data loader read one source; this run mixes "
                        f"{n_sources} (data.mix); resume with the data it was saved with")
    if len(state["per_source"]) != n_sources or not np.allclose(state["weights"], probabilities):
        raise DataError(f"the checkpoint mixed {len(state['per_source'])} sources with weights "
                        f"{state['weights']}, this run {n_sources} with {probabilities.tolist()}; "
                        "resume with the data.mix it was saved with")


def mixture_probabilities(n_sources: int, weights: Sequence[float]) -> np.ndarray:
    if n_sources != len(weights) or not n_sources:
        raise DataError(f"{n_sources} sources and {len(weights)} weights; give one weight per source")
    if any(not w > 0 for w in weights):
        raise DataError(f"data.mix weights must be > 0, got {list(weights)}")
    total = float(sum(weights))
    return np.array([w / total for w in weights])


class MixtureLoader:
    """Shuffled packed batches over weighted sources for one data-parallel rank; resumable via state_dict."""

    def __init__(self, sources: Sequence[np.ndarray], weights: Sequence[float], seq_len: int,
                 global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 names: Sequence[str] = ()):
        self.probabilities = mixture_probabilities(len(sources), weights)
        # One PackedLoader per source does the windowing and per-epoch shuffling; it is never asked for a batch.
        self._parts = []
        for i, tokens in enumerate(sources):
            try:
                self._parts.append(PackedLoader(tokens, seq_len, global_batch_size, 0, 1, seed=seed + 1 + i))
            except DataError as err:
                name = names[i] if i < len(names) else f"source {i}"
                raise DataError(f"data.mix {name}: {err}") from err
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        if global_batch_size % dp_size != 0:
            raise DataError(f"global_batch_size {global_batch_size} is not divisible by the data-parallel "
                            f"size {dp_size}; use a multiple of {dp_size}")
        self.local_batch_size = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.seed = seed
        self.samples_consumed = 0
        self.per_source = [0] * len(sources)  # samples each source has given

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets), each (global_batch_size / dp_size, seq_len) int64."""
        choices, slot_in_source = draw_sources(self.seed, self.samples_consumed, self.probabilities,
                                        self.global_batch_size, self.per_source)
        lo = self.dp_rank * self.local_batch_size
        mine = slice(lo, lo + self.local_batch_size)
        rows = [self._parts[int(source)].window(int(slot)) for source, slot in zip(choices[mine], slot_in_source[mine])]
        for i in range(len(self._parts)):
            self.per_source[i] += int((choices == i).sum())
        self.samples_consumed += self.global_batch_size
        return _rows(rows)

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed, "seq_len": self.seq_len,
                "per_source": list(self.per_source), "weights": self.probabilities.tolist()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the mixture must be the saved one (same sources and weights)."""
        check_mixture_state(state, len(self._parts), self.probabilities)
        if state["seq_len"] != self.seq_len:
            raise DataError(f"the saved data loader used seq_len {state['seq_len']}, but this run uses "
                            f"{self.seq_len}; resume with seq_len {state['seq_len']}")
        self.samples_consumed = int(state["samples_consumed"])
        self.seed = int(state["seed"])
        self.per_source = [int(n) for n in state["per_source"]]
        for i, part in enumerate(self._parts):
            part.load_state_dict({"samples_consumed": 0, "seed": self.seed + 1 + i, "seq_len": self.seq_len})


def _rows(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    batch = torch.from_numpy(np.stack(rows).astype(np.int64))
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


@dataclass(frozen=True)
class Mixture:
    """How a finetune/align data set's train rows came together: `sizes[i]` rows of source i, concatenated in
    data.mix order, drawn by `weights`."""

    sizes: tuple[int, ...]
    weights: tuple[float, ...]
    names: tuple[str, ...]

    def describe(self) -> str:
        total = sum(self.weights)
        return "mixed " + ", ".join(f"{n} ({w / total:.0%}, {s} rows)" for n, s, w in
                                    zip(self.names, self.sizes, self.weights))


def concat_rows(parts: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows of several sources, one after another, right-padded with zeros to the widest (2-D tensors)."""
    width = max((v.shape[1] for p in parts for v in p.values() if v.dim() == 2), default=0)
    return {k: torch.cat([_pad_to(p[k], width) for p in parts]) for k in parts[0]}


def _pad_to(v: torch.Tensor, width: int) -> torch.Tensor:
    return v if v.dim() != 2 or v.shape[1] == width else torch.nn.functional.pad(v, (0, width - v.shape[1]))
