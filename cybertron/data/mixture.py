"""Packed batches drawn from several token streams in proportion to their weights (data.mix).

Global batch b (starting at global sample c) draws the source of each of its G slots from a generator
seeded by (seed, c): a pure function of the position, the same on every rank and in every layout. Source i
then supplies its next windows in its own seeded per-epoch permutation (the PackedLoader rule over that
source alone), so the loader's state is the global sample count plus how many samples each source has
given; a resumed run restores both and sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cybertron.data.loader import PackedLoader
from cybertron.errors import DataError

_MIX_STREAM = 0x6D6978  # separates the draw of sources from every per-source permutation's generator


class MixtureLoader:
    """Shuffled packed batches over weighted sources for one data-parallel rank; resumable via state_dict."""

    def __init__(self, sources: Sequence[np.ndarray], weights: Sequence[float], seq_len: int,
                 global_batch_size: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 names: Sequence[str] = ()):
        if len(sources) != len(weights) or not sources:
            raise DataError(f"{len(sources)} sources and {len(weights)} weights; give one weight per source")
        if any(not w > 0 for w in weights):
            raise DataError(f"data.mix weights must be > 0, got {list(weights)}")
        # One PackedLoader per source does the windowing and per-epoch shuffling; it is never asked for a batch.
        self._parts = []
        for i, tokens in enumerate(sources):
            try:
                self._parts.append(PackedLoader(tokens, seq_len, global_batch_size, 0, 1, seed=seed + 1 + i))
            except DataError as err:
                name = names[i] if i < len(names) else f"source {i}"
                raise DataError(f"data.mix {name}: {err}") from err
        total = float(sum(weights))
        self.probabilities = np.array([w / total for w in weights])
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

    def _choices(self) -> np.ndarray:
        rng = np.random.default_rng([self.seed, _MIX_STREAM, self.samples_consumed])
        return rng.choice(len(self._parts), size=self.global_batch_size, p=self.probabilities)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets), each (global_batch_size / dp_size, seq_len) int64."""
        choices = self._choices()
        # Each slot's index within its source: that source's count so far plus its rank among earlier slots.
        slot_in_source = np.empty(len(choices), dtype=np.int64)
        for i in range(len(self._parts)):
            mine = choices == i
            slot_in_source[mine] = self.per_source[i] + np.arange(int(mine.sum()))
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
        if "per_source" not in state:
            raise DataError("the checkpoint's data loader read one source; this run mixes "
                            f"{len(self._parts)} (data.mix); resume with the data it was saved with")
        if len(state["per_source"]) != len(self._parts) or not np.allclose(state["weights"], self.probabilities):
            raise DataError(f"the checkpoint mixed {len(state['per_source'])} sources with weights "
                            f"{state['weights']}, this run {len(self._parts)} with {self.probabilities.tolist()}; "
                            "resume with the data.mix it was saved with")
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
