"""data.mix for finetune and align: rows drawn from weighted sources by the seeded rule MixtureLoader follows,
exactly resumable, and one-line errors for a mixture the run cannot use."""

import numpy as np
import pytest
import torch

from cybertron.data.loader import PackedLoader
from cybertron.data.mixture import _MIX_STREAM, Mixture, MixtureLoader, concat_rows, parse_mix
from cybertron.data.sft import RowLoader, RowMixtureLoader, row_loader
from cybertron.errors import ConfigError, DataError

SIZES, WEIGHTS = (7, 3, 5), (0.5, 0.2, 0.3)
MIXTURE = Mixture(SIZES, WEIGHTS, ("a", "b", "c"))
# Row r of source i holds 100 * i + r: a drawn row names its source and its index there.
ROWS = {"inputs": torch.tensor([100 * i + r for i, n in enumerate(SIZES) for r in range(n)]).unsqueeze(1)}


def reference(seed: int, batches: int, batch: int) -> list[int]:
    """The rule restated: slot sources from rng((seed, tag, c)); source i's k-th row is perm_e[k % n_i] of
    rng((seed + 1 + i, e)), e = k // n_i."""
    counts, out = [0, 0, 0], []
    p = np.array(WEIGHTS) / sum(WEIGHTS)
    for b in range(batches):
        for source in np.random.default_rng([seed, _MIX_STREAM, b * batch]).choice(3, size=batch, p=p):
            i = int(source)
            n, k = SIZES[i], counts[i]
            out.append(100 * i + int(np.random.default_rng([seed + 1 + i, k // n]).permutation(n)[k % n]))
            counts[source] += 1
    return out


def test_rows_follow_the_seeded_mixture_rule():
    loader = RowMixtureLoader(ROWS, MIXTURE, batch_size=6, seed=5)
    seen = [v for _ in range(12) for v in loader.next_batch()["inputs"][:, 0].tolist()]  # every source wraps
    assert seen == reference(5, 12, 6)
    assert loader.per_source == [sum(1 for v in seen if v // 100 == i) for i in range(3)]


def test_resume_sees_the_uninterrupted_batches():
    uninterrupted = RowMixtureLoader(ROWS, MIXTURE, 4, seed=2)
    for _ in range(5):
        uninterrupted.next_batch()
    resumed = RowMixtureLoader(ROWS, MIXTURE, 4, seed=0)  # the saved seed wins
    resumed.load_state_dict(uninterrupted.state_dict())
    for _ in range(8):
        assert torch.equal(resumed.next_batch()["inputs"], uninterrupted.next_batch()["inputs"])


def test_a_saved_mixture_and_a_single_source_do_not_mix():
    mixed = RowMixtureLoader(ROWS, MIXTURE, 4).state_dict()
    with pytest.raises(DataError, match="mixed 3 sources .*resume with the data.mix it was saved with"):
        RowLoader(ROWS, 4).load_state_dict(mixed)
    with pytest.raises(DataError, match="resume with the data.mix it was saved with"):
        RowMixtureLoader(ROWS, Mixture(SIZES, (1, 1, 1), ("a", "b", "c")), 4).load_state_dict(mixed)
    with pytest.raises(DataError, match="read one source; this run mixes 3"):
        RowMixtureLoader(ROWS, MIXTURE, 4).load_state_dict(RowLoader(ROWS, 4).state_dict())
    assert isinstance(row_loader(ROWS, 4, 0), RowLoader)
    packed = MixtureLoader([np.arange(50), np.arange(50)], [1, 1], 4, 2).state_dict()
    with pytest.raises(DataError, match="mixed 2 sources .*resume with the data.mix it was saved with"):
        PackedLoader(np.arange(50), 4, 2).load_state_dict(packed)


def test_a_source_without_train_rows_is_named():
    rows = {"inputs": torch.zeros(10, 1)}
    with pytest.raises(DataError, match="data.mix b: no training rows"):
        RowMixtureLoader(rows, Mixture((10, 0), (1, 1), ("a", "b")), 4)


def test_rows_of_different_widths_concatenate_right_padded():
    rows = concat_rows([{"ids": torch.ones(2, 3, dtype=torch.long), "len": torch.tensor([3, 2])},
                        {"ids": torch.ones(1, 5, dtype=torch.long), "len": torch.tensor([5])}])
    assert rows["ids"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert rows["len"].tolist() == [3, 2, 5]


def test_mix_entries_take_only_the_keys_of_their_command():
    entries = parse_mix([{"path": "a.jsonl", "weight": "3", "format": "alpaca"}, {"path": "b"}], ("format",))
    assert [(e.path, e.weight, e.option("format", "auto")) for e in entries] == \
        [("a.jsonl", 3.0, "alpaca"), ("b", 1.0, "auto")]
    with pytest.raises(ConfigError, match=r"entry 1 .* may give weight, format; unknown \['text_field'\]"):
        parse_mix([{"path": "a", "text_field": "body"}], ("format",))
    with pytest.raises(ConfigError, match="weight must be a number > 0"):
        parse_mix([{"path": "a", "weight": "0"}])
