"""Packed batches from a token stream, with a position that does not depend on the parallel layout.

The stream is cut into windows of seq_len + 1 tokens at stride seq_len (inputs and shifted targets).
Training visits the windows in a fresh seeded permutation each epoch. The loader's whole state is the
number of *global* samples consumed: global batch b is slots [b*G, (b+1)*G) of the endless shuffled
sequence, and data-parallel rank r takes its contiguous share of them. So a run saved with 4 ranks
resumes with 2 (or 1) at exactly the same sample.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from cybertron.errors import DataError


def _windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets (B, seq_len) int64 from windows tokens[s : s + seq_len + 1]."""
    # One contiguous slice per window: on a memmap this reads each window with a single sequential copy.
    batch = np.stack([tokens[s:s + seq_len + 1] for s in starts]).astype(np.int64)
    batch = torch.from_numpy(batch)
    return batch[:, :-1].contiguous(), batch[:, 1:].contiguous()


def _count_windows(n_tokens: int, seq_len: int) -> int:
    return max(n_tokens - 1, 0) // seq_len


class PackedLoader:
    """Shuffled packed training batches for one data-parallel rank; resumable via state_dict."""

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch_size: int, dp_rank: int = 0,
                 dp_size: int = 1, seed: int = 0):
        if seq_len < 1 or global_batch_size < 1:
            raise DataError(f"seq_len {seq_len} and global_batch_size {global_batch_size} must both be >= 1")
        if global_batch_size % dp_size != 0:
            raise DataError(f"global_batch_size {global_batch_size} is not divisible by the data-parallel "
                            f"size {dp_size}; use a multiple of {dp_size}")
        assert 0 <= dp_rank < dp_size, f"dp_rank {dp_rank} outside [0, {dp_size})"
        self.n_samples = _count_windows(len(tokens), seq_len)
        if self.n_samples == 0:
            raise DataError(f"data has {len(tokens)} tokens, fewer than seq_len+1 = {seq_len + 1} needed for "
                            "one training sample; use more data or a smaller seq_len")
        self._tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // dp_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.samples_consumed = 0
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def epoch(self) -> int:
        """The epoch the next sample comes from (0-based)."""
        return self.samples_consumed // self.n_samples

    def _permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._permutations:
            # A batch spans at most two epochs (or more if G > n_samples): keep only recent ones.
            if len(self._permutations) >= 2:
                self._permutations.pop(min(self._permutations))
            rng = np.random.default_rng([self.seed, epoch])
            self._permutations[epoch] = rng.permutation(self.n_samples)
        return self._permutations[epoch]

    def _sample_indices(self, slots: np.ndarray) -> np.ndarray:
        """Window index of each global slot: slot s is perm_{s // n}[s % n]."""
        epochs, positions = np.divmod(slots, self.n_samples)
        indices = np.empty_like(slots)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            indices[in_epoch] = self._permutation(int(epoch))[positions[in_epoch]]
        return indices

    def window(self, slot: int) -> np.ndarray:
        """The seq_len + 1 tokens of the sample at position `slot` of the endless shuffled sequence."""
        start = int(self._sample_indices(np.array([slot], dtype=np.int64))[0]) * self.seq_len
        return self._tokens[start:start + self.seq_len + 1]

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's (inputs, targets), each (global_batch_size / dp_size, seq_len) int64."""
        first = self.samples_consumed + self.dp_rank * self.local_batch_size
        slots = np.arange(first, first + self.local_batch_size, dtype=np.int64)
        starts = self._sample_indices(slots) * self.seq_len
        self.samples_consumed += self.global_batch_size
        return _windows(self._tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        return {"samples_consumed": self.samples_consumed, "seed": self.seed, "seq_len": self.seq_len}

    def load_state_dict(self, state: dict) -> None:
        """Continue from a saved position; the saved seed wins so the data order matches the saved run."""
        if "per_source" in state:
            raise DataError(f"the checkpoint's data loader mixed {len(state['per_source'])} sources (data.mix); "
                            "this run reads one; resume with the data.mix it was saved with")
        missing = {"samples_consumed", "seed", "seq_len"} - set(state)
        if missing:
            raise DataError(f"data loader state lacks {sorted(missing)}; it needs samples_consumed, seed "
                            "and seq_len")
        if state["seq_len"] != self.seq_len:
            raise DataError(f"the saved data loader used seq_len {state['seq_len']}, but this run uses "
                            f"{self.seq_len}; resume with seq_len {state['seq_len']}")
        self.samples_consumed = int(state["samples_consumed"])
        self.seed = int(state["seed"])
        self._permutations.clear()


def iter_eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int,
                      max_batches: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Unshuffled, non-overlapping windows in batches (the last may be smaller); at most max_batches.

    When the budget covers fewer windows than the data holds, the chosen windows are spread evenly over the
    whole stream: the first N windows would measure only the first few validation documents."""
    available = _count_windows(len(tokens), seq_len)
    wanted = min(available, batch_size * max(max_batches, 0))
    if wanted == 0:
        return
    # Evenly spaced window indices (all of them when the budget allows), always deterministic.
    indices = (np.arange(wanted, dtype=np.int64) * available) // wanted
    for first in range(0, wanted, batch_size):
        yield _windows(tokens, indices[first:first + batch_size] * seq_len, seq_len)
