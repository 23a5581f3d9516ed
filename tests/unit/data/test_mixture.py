"""data.mix: batches drawn from weighted sources, deterministic and exactly resumable."""

import numpy as np
import pytest
import torch

from cybertron.data.mixture import _MIX_STREAM, MixtureLoader
from cybertron.errors import DataError

SEQ_LEN = 8
# Source i holds tokens 1000*i + position: a row's first token names its source and window.
SOURCES = [np.arange(1000 * i, 1000 * i + n, dtype=np.uint16) for i, n in enumerate([203, 97, 161])]
WEIGHTS = [0.5, 0.2, 0.3]


def identify(inputs: torch.Tensor) -> list[tuple[int, int]]:
    first = inputs[:, 0].tolist()
    return [(t // 1000, (t % 1000) // SEQ_LEN) for t in first]


def reference(seed: int, batches: int, batch: int) -> list[tuple[int, int]]:
    """The spec restated: slot sources from rng((seed, tag, c)); source i's k-th sample is perm_e[k % n_i]
    of rng((seed + 1 + i, e)), e = k // n_i."""
    counts = [0] * len(SOURCES)
    sizes = [(len(s) - 1) // SEQ_LEN for s in SOURCES]
    out = []
    for b in range(batches):
        p = np.array(WEIGHTS) / sum(WEIGHTS)
        for source in np.random.default_rng([seed, _MIX_STREAM, b * batch]).choice(3, size=batch, p=p):
            k = counts[source]
            perm = np.random.default_rng([seed + 1 + int(source), k // sizes[source]]).permutation(sizes[source])
            out.append((int(source), int(perm[k % sizes[source]])))
            counts[source] += 1
    return out


def test_batches_follow_the_seeded_mixture_rule():
    loader = MixtureLoader(SOURCES, WEIGHTS, SEQ_LEN, global_batch_size=16, seed=7)
    seen = []
    for _ in range(20):  # 320 samples: the smallest source (12 windows) wraps several epochs
        inputs, targets = loader.next_batch()
        assert torch.equal(targets, inputs + 1)
        seen += identify(inputs)
    assert seen == reference(7, 20, 16)


def test_sources_appear_in_proportion_to_their_weights():
    loader = MixtureLoader(SOURCES, [3, 1, 1], SEQ_LEN, global_batch_size=100, seed=0)
    sources = np.array([s for _ in range(40) for s, _ in identify(loader.next_batch()[0])])
    shares = np.bincount(sources, minlength=3) / len(sources)
    assert np.allclose(shares, [0.6, 0.2, 0.2], atol=0.02)  # 4000 draws: 3 standard deviations is ~0.023


@pytest.mark.parametrize("dp_size", [2, 4])
def test_ranks_concatenate_to_the_single_process_batch(dp_size):
    single = MixtureLoader(SOURCES, WEIGHTS, SEQ_LEN, 8, seed=3)
    ranks = [MixtureLoader(SOURCES, WEIGHTS, SEQ_LEN, 8, dp_rank=r, dp_size=dp_size, seed=3) for r in range(dp_size)]
    for _ in range(6):
        expected = single.next_batch()[0]
        assert torch.equal(torch.cat([loader.next_batch()[0] for loader in ranks]), expected)


def test_resume_on_another_layout_sees_the_uninterrupted_batches():
    uninterrupted = MixtureLoader(SOURCES, WEIGHTS, SEQ_LEN, 8, seed=11)
    saved_by_two = [MixtureLoader(SOURCES, WEIGHTS, SEQ_LEN, 8, dp_rank=r, dp_size=2, seed=11) for r in range(2)]
    for _ in range(5):
        uninterrupted.next_batch()
        for loader in saved_by_two:
            loader.next_batch()
    state = saved_by_two[1].state_dict()
    resumed = MixtureLoader(SOURCES, WEIGHTS, SEQ_LEN, 8, seed=0)  # the saved seed wins
    resumed.load_state_dict(state)
    for _ in range(10):
        assert torch.equal(resumed.next_batch()[0], uninterrupted.next_batch()[0])


def test_resuming_with_another_mixture_is_a_data_error():
    state = MixtureLoader(SOURCES, WEIGHTS, SEQ_LEN, 8).state_dict()
    with pytest.raises(DataError, match="resume with the data.mix it was saved with"):
        MixtureLoader(SOURCES, [0.2, 0.5, 0.3], SEQ_LEN, 8).load_state_dict(state)
    with pytest.raises(DataError, match="read one source"):
        MixtureLoader(SOURCES, WEIGHTS, SEQ_LEN, 8).load_state_dict({"samples_consumed": 0, "seed": 0,
                                                                    "seq_len": SEQ_LEN})


def test_a_source_too_small_for_one_sample_is_named():
    with pytest.raises(DataError, match="data.mix tiny.txt: data has 4 tokens"):
        MixtureLoader([SOURCES[0], SOURCES[1][:4]], [1, 1], SEQ_LEN, 8, names=["big.txt", "tiny.txt"])


def test_mix_from_the_command_line_and_toml_round_trip(tmp_path):
    from cybertron.config import TrainConfig, apply_toml, parse_args, to_toml
    from cybertron.data.prepare import SourcePart, mix_parts

    cfg = parse_args(["--data.mix", "path=a.jsonl,weight=0.7", "--data.mix", "path=hf:owner/name,text_field=body"],
                     TrainConfig())
    parts = mix_parts(cfg.data.mix, cfg.data.text_field)
    assert parts == [SourcePart("a.jsonl", 0.7, "text"), SourcePart("hf:owner/name", 1.0, "body")]
    (tmp_path / "run.toml").write_text(to_toml(cfg))
    again = TrainConfig()
    apply_toml(again, tmp_path / "run.toml")
    assert mix_parts(again.data.mix, again.data.text_field) == parts


@pytest.mark.parametrize("argv, fragment", [
    (["--data.mix", "path=a,weight=-1"], "data.mix entry 1 \\(a\\): weight must be a number > 0"),
    (["--data.mix", "weight=2"], "data.mix entry 1 .* needs a path"),
    (["--data.mix", "path=a,wieght=2"], "unknown \\['wieght'\\]"),
    (["--data.mix", "a.txt"], "data.mix expects a table such as path=FILE,weight=0.5"),
    (["--data.path", "x.txt", "--data.mix", "path=a"], "give data.path \\(x.txt\\) or data.mix, not both"),
])
def test_a_bad_mix_is_one_config_error(argv, fragment):
    from cybertron.config import TrainConfig, parse_args
    from cybertron.errors import ConfigError
    from cybertron.pretrain import validate

    with pytest.raises(ConfigError, match=fragment):
        validate(parse_args(argv, TrainConfig()))
