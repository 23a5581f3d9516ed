"""A rank's place in a layout, without processes: which rows of a batch each data-parallel rank takes (the
tensor-parallel ranks of a replica take the same ones), and how work split over every rank covers each row
once."""

from cybertron.parallel.dims import ParallelDims
from cybertron.parallel.runtime import DistEnv
from cybertron.parallel.world import World


def _world(rank: int, size: int, **degrees) -> World:
    return World(DistEnv(rank, rank, size), ParallelDims.resolve(size, **degrees))


def test_row_shares_cover_every_row_once_in_order():
    for n, size in [(10, 3), (2, 3), (8, 4), (0, 2)]:
        shares = [_world(rank, size).row_share(n) for rank in range(size)]
        covered = [i for s in shares for i in range(n)[s]]
        assert covered == list(range(n))
    assert _world(2, 3).row_share(2) == slice(2, 2)  # more ranks than rows: an empty share


def test_batch_slices_are_equal_and_contiguous():
    assert [_world(r, 4, data_parallel="ddp").local_slice(8) for r in range(4)] == \
        [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]


def test_tensor_and_pipeline_ranks_of_a_replica_take_the_same_rows():
    # 8 ranks as pp 2 x dp_shard 2 x tp 2: ranks (0,1) are replica 0's tp pair on stage 0, (4,5) on stage 1
    worlds = [_world(r, 8, pp=2, tp=2) for r in range(8)]
    assert [w.dp_rank for w in worlds] == [0, 0, 1, 1, 0, 0, 1, 1]
    assert worlds[0].local_slice(4) == worlds[5].local_slice(4) == slice(0, 2)
