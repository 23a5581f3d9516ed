"""Pure data parallelism's arithmetic, without processes: how rows and batches split over ranks, and the
checks that run before any process group exists."""

import pytest

from cybertron.errors import ConfigError
from cybertron.parallel.data_only import DataParallel, validate_data_parallel
from cybertron.parallel.runtime import DistEnv


def test_row_shares_cover_every_row_once_in_order():
    for n, world in [(10, 3), (2, 3), (8, 4), (0, 2)]:
        shares = [DataParallel(DistEnv(rank, rank, world)).row_share(n) for rank in range(world)]
        covered = [i for s in shares for i in range(n)[s]]
        assert covered == list(range(n))
    assert DataParallel(DistEnv(2, 2, 3)).row_share(2) == slice(2, 2)  # more ranks than rows: an empty share


def test_batch_slices_are_equal_and_contiguous():
    assert [DataParallel(DistEnv(r, r, 4)).local_slice(8) for r in range(4)] == \
        [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]


@pytest.mark.parametrize("mode, world, batch, micro, fragment", [
    ("zero1", 2, 8, 0, "parallel.data_parallel must be one of ddp, zero3"),
    ("ddp", 3, 8, 0, "not divisible by the 3 ranks"),
    ("ddp", 2, 8, 3, "train.micro_batch_size=3 does not divide the per-rank batch 4"),
])
def test_impossible_splits_name_the_key(mode, world, batch, micro, fragment):
    with pytest.raises(ConfigError, match=fragment):
        validate_data_parallel(mode, world, batch, micro)
    validate_data_parallel("ddp", 2, 8, 2)  # a possible one passes
