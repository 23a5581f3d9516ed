"""Context parallelism without processes: the zigzag chunks cover every token once and give every cp rank
the same causal work; a rank's place among cp and dp ranks; each refused layout ends in one error naming
the key."""

from types import SimpleNamespace

import pytest

from cybertron.config import TrainConfig
from cybertron.errors import ConfigError
from cybertron.parallel.context_parallel import zigzag_indices
from cybertron.parallel.dims import ParallelDims
from cybertron.parallel.runtime import DistEnv
from cybertron.parallel.world import World
from cybertron.pretrain import validate


@pytest.mark.parametrize("cp", [1, 2, 4])
def test_zigzag_chunks_cover_the_sequence_and_balance_causal_work(cp):
    t = 32
    shares = [zigzag_indices(t, cp, rank).tolist() for rank in range(cp)]
    assert sorted(i for share in shares for i in share) == list(range(t))
    # token i attends to i + 1 keys under a causal mask: every rank's sum is the whole's / cp
    work = [sum(i + 1 for i in share) for share in shares]
    assert work == [t * (t + 1) // 2 // cp] * cp
    assert shares[0][:t // (2 * cp)] == list(range(t // (2 * cp)))  # rank 0 holds the first chunk...
    assert shares[0][-1] == t - 1  # ...and the last


def test_cp_ranks_share_rows_and_dp_ranks_do_not():
    # 8 ranks as dp_shard 2 x cp 2 x tp 2, laid out row-major (dp_shard, cp, tp)
    worlds = [World(DistEnv(r, r, 8), ParallelDims.resolve(8, cp=2, tp=2)) for r in range(8)]
    assert worlds[0].dims.dp_shard == 2 and worlds[0].dims.dp_cp == 4
    assert [w.dp_rank for w in worlds] == [0, 0, 0, 0, 1, 1, 1, 1]
    assert [w.cp_rank for w in worlds] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert worlds[2].local_slice(8) == worlds[0].local_slice(8) == slice(0, 4)


@pytest.mark.parametrize(("degrees", "message"), [
    ({"cp": 2, "pp": 2}, r"parallel\.cp=2 does not compose with parallel\.pp=2"),
    ({"cp": 2, "ep": 2}, r"parallel\.cp=2 does not compose with parallel\.ep=2"),
    ({"cp": 0}, r"parallel\.cp must be >= 1"),
    ({"cp": 3}, r"world size 4 is not divisible by parallel\.dp_replicate x tp x pp x cp = 3"),
])
def test_bad_cp_layouts_are_refused(degrees, message):
    with pytest.raises(ConfigError, match=message):
        ParallelDims.resolve(4, **degrees)


def test_cp_with_sliding_window_is_refused():
    model = SimpleNamespace(n_experts=0, sliding_window=16, n_layers=2, tie_embeddings=False)
    with pytest.raises(ConfigError, match=r"model\.sliding_window=16"):
        ParallelDims.resolve(2, cp=2).validate_model(model)


def _cfg(seq_len: int, cp: int) -> TrainConfig:
    cfg = TrainConfig()
    cfg.train.device = "cpu"
    cfg.data.seq_len, cfg.parallel.cp = seq_len, cp
    return cfg


def test_seq_len_must_split_into_2cp_chunks():
    validate(_cfg(64, 4), world_size=4)
    with pytest.raises(ConfigError, match=r"data\.seq_len=36 must be a multiple of 2 x parallel\.cp = 8"):
        validate(_cfg(36, 4), world_size=4)
    cfg = _cfg(24, 2)
    cfg.parallel.tp = 2  # 24 / cp 2 = 12 tokens per rank split over tp 2 under sequence parallelism: fine
    validate(cfg, world_size=4)
    cfg = _cfg(20, 2)
    cfg.parallel.tp = 4  # 10 tokens per rank cannot be split over tp 4
    with pytest.raises(ConfigError, match=r"data\.seq_len=20 / parallel\.cp=2 = 10 must be a multiple of "
                                          r"parallel\.tp=4"):
        validate(cfg, world_size=8)


def test_cli_refuses_a_seq_len_cp_cannot_split_in_one_line(tmp_path, capsys):
    from cybertron.cli import main as cli_main

    assert cli_main(["train", "--nproc", "2", "--parallel.cp", "2", "--data.seq_len", "30",
                     "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == ["error: data.seq_len=30 must be a multiple of 2 x parallel.cp = 4 (context "
                                "parallelism splits each sequence into 2 x cp equal chunks)"]
    assert not (tmp_path / "x").exists()
