"""Expert parallelism without processes: the ep dimension's arithmetic and its one-line errors (ep borrows its
ranks from dp_shard, torchtitan's convention, so the world is pp x dp_replicate x dp_shard x tp whatever ep
is), and the reorder of received tokens from source-rank-major to expert-major, empty blocks included."""

import pytest
import torch

from cybertron.errors import ConfigError
from cybertron.models.presets import preset_config
from cybertron.parallel.dims import EP_MESH_DIMS, MESH_DIMS, ParallelDims
from cybertron.parallel.expert_parallel import _expert_major_order

MOE = preset_config("debug", vocab_size=256, n_experts=4, top_k=2)


def test_ep_borrows_from_dp_shard_without_changing_the_world():
    dims = ParallelDims.resolve(8, tp=2, ep=2)
    assert (dims.dp_shard, dims.ep, dims.efsdp, dims.dp) == (4, 2, 2, 4)
    assert dims.mesh_dims == EP_MESH_DIMS and ParallelDims.resolve(8, tp=2).mesh_dims == MESH_DIMS
    assert dims.describe() == "zero3 dp_shard=4 x tp=2 x ep=2"
    dims.validate_model(MOE)


@pytest.mark.parametrize("world, degrees, model, fragment", [
    (4, {"ep": 3}, MOE, "parallel.ep=3 must divide parallel.dp_shard=4"),
    (8, {"ep": 8}, MOE, "parallel.ep=8 must divide model.n_experts=4"),
    (2, {"ep": 2}, preset_config("debug"), "parallel.ep=2 needs a mixture-of-experts model"),
    (2, {"ep": 2, "data_parallel": "zero1"}, MOE, "parallel.ep=2 needs parallel.data_parallel zero2 or zero3"),
    (2, {"ep": 0}, MOE, "parallel.ep must be >= 1"),
])
def test_bad_ep_is_one_line_naming_the_key(world, degrees, model, fragment):
    with pytest.raises(ConfigError) as err:
        ParallelDims.resolve(world, **degrees).validate_model(model)
    assert fragment in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("received", [[[2, 0, 1], [0, 0, 3]], [[0, 0], [0, 0]], [[1, 2], [3, 4], [0, 5]]])
def test_received_rows_are_reordered_by_expert_then_source_rank(received):
    counts = torch.tensor(received)  # counts[r][j]: rows from rank r for local expert j
    labels = [(r, j) for r, row in enumerate(received) for j, n in enumerate(row) for _ in range(n)]
    order = _expert_major_order(counts)
    assert [labels[i] for i in order.tolist()] == sorted(labels, key=lambda rj: (rj[1], rj[0]))
