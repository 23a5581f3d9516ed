"""ParallelDims: the degrees of every parallel dimension, validated once, and the one DeviceMesh built from them.

Validation needs only the world size and the model's shape, so a bad layout fails before any process group
or model exists, with a message that names the constraint. The mesh always has the dims
("pp", "dp_replicate", "dp_shard", "cp", "tp") (size-1 dims included, which keeps slicing uniform) plus a
flattened "dp" = dp_replicate x dp_shard for sums over data-parallel ranks.

Context parallelism (cp > 1) follows torchtitan: cp ranks see the same rows, each a 1/cp share of every
sequence (parallel/context_parallel.py), so world = pp x dp_replicate x dp_shard x cp x tp. The parameters
are FSDP-sharded over "dp_shard_cp" = dp_shard x cp (a cp rank computes gradients from other tokens, so its
gradients are reduced like a data-parallel rank's), and losses and token counts are summed over "dp_cp" =
dp_replicate x dp_shard x cp. The data-parallel degree ("dp", which rows a rank sees) is unchanged.

Expert parallelism (ep > 1) follows torchtitan: it adds no ranks to the world, it borrows them from the FSDP
shard ranks. world = pp x dp_replicate x dp_shard x tp as without it, ep must divide dp_shard, and dp_shard
splits into efsdp x ep (ep innermost, so an expert-parallel group is ep neighbouring shard ranks). The mesh
then has the dims ("pp", "dp_replicate", "efsdp", "ep", "tp"), with "dp_shard" = efsdp x ep flattened: the
dense parameters are FSDP-sharded over dp_shard as usual, each expert-parallel rank holds n_experts / ep whole
experts, and those are FSDP-sharded over the efsdp ranks (the shard ranks expert parallelism does not use).
Example: 8 ranks, tp 2, ep 2 -> dp_shard 4 = efsdp 2 x ep 2; every rank sees its own data (dp 4) and holds
half the experts, each split over 2 ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from cybertron.errors import ConfigError
from cybertron.models.config import ModelConfig

DATA_PARALLEL = ("ddp", "zero1", "zero2", "zero3")
MESH_DIMS = ("pp", "dp_replicate", "dp_shard", "cp", "tp")
EP_MESH_DIMS = ("pp", "dp_replicate", "efsdp", "ep", "cp", "tp")  # when ep > 1: dp_shard split into efsdp x ep


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int = 1
    dp_shard: int = 1
    cp: int = 1
    tp: int = 1
    pp: int = 1
    ep: int = 1
    world_size: int = 1
    data_parallel: str = "zero3"

    @classmethod
    def resolve(cls, world_size: int, dp_replicate: int = 1, dp_shard: int = -1, tp: int = 1, pp: int = 1,
                data_parallel: str = "zero3", cp: int = 1, ep: int = 1) -> ParallelDims:
        """Fill in dp_shard=-1 ("the rest of the world") and check that the degrees multiply to world_size.

        ddp and zero1 replicate over every data-parallel rank, so their degree dp_replicate x dp_shard is
        moved entirely to dp_replicate."""
        if data_parallel not in DATA_PARALLEL:
            raise ConfigError(f"parallel.data_parallel must be one of {', '.join(DATA_PARALLEL)}, "
                              f"got {data_parallel!r}")
        for name, value in (("dp_replicate", dp_replicate), ("tp", tp), ("pp", pp), ("cp", cp), ("ep", ep)):
            if value < 1:
                raise ConfigError(f"parallel.{name} must be >= 1, got {value}")
        if cp > 1 and pp > 1:
            raise ConfigError(f"parallel.cp={cp} does not compose with parallel.pp={pp} yet; use one of them")
        if cp > 1 and ep > 1:
            raise ConfigError(f"parallel.cp={cp} does not compose with parallel.ep={ep} yet; use one of them")
        if ep > 1 and data_parallel in ("ddp", "zero1"):
            raise ConfigError(f"parallel.ep={ep} needs parallel.data_parallel zero2 or zero3: each expert-parallel "
                              f"rank holds other experts, which {data_parallel} would average as replicas")
        if dp_shard == -1:
            others = dp_replicate * tp * pp * cp
            if world_size % others:
                raise ConfigError(f"world size {world_size} is not divisible by parallel.dp_replicate x tp x pp "
                                  f"x cp = {others}, so parallel.dp_shard=-1 cannot take the rest")
            dp_shard = world_size // others
        elif dp_shard < 1:
            raise ConfigError(f"parallel.dp_shard must be >= 1 or -1 (the rest), got {dp_shard}")
        product = dp_replicate * dp_shard * tp * pp * cp
        if product != world_size:
            raise ConfigError(f"parallel degrees dp_replicate={dp_replicate} x dp_shard={dp_shard} x tp={tp} x "
                              f"pp={pp} x cp={cp} = {product} must equal the world size {world_size}")
        if dp_shard % ep:
            raise ConfigError(f"parallel.ep={ep} must divide parallel.dp_shard={dp_shard}: expert parallelism "
                              f"borrows its ranks from the FSDP shard ranks (world {world_size} = pp {pp} x "
                              f"dp_replicate {dp_replicate} x dp_shard {dp_shard} x tp {tp})")
        if data_parallel in ("ddp", "zero1"):
            dp_replicate, dp_shard = dp_replicate * dp_shard, 1
        return cls(dp_replicate, dp_shard, cp, tp, pp, ep, world_size, data_parallel)

    @property
    def dp(self) -> int:
        """Data-parallel degree: how many ranks see different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def efsdp(self) -> int:
        """The shard ranks expert parallelism does not use: each expert is FSDP-sharded over them."""
        return self.dp_shard // self.ep

    @property
    def mesh_dims(self) -> tuple[str, ...]:
        return EP_MESH_DIMS if self.ep > 1 else MESH_DIMS

    @property
    def is_distributed(self) -> bool:
        return self.world_size > 1

    @property
    def dp_cp(self) -> int:
        """Ranks that hold different tokens of the step's batch: losses and gradients are summed over them."""
        return self.dp * self.cp

    def describe(self) -> str:
        names = (*MESH_DIMS, "ep")
        parts = [f"{name}={getattr(self, name)}" for name in names if getattr(self, name) > 1]
        return f"{self.data_parallel} " + (" x ".join(parts) or "single process")

    def validate_model(self, cfg: ModelConfig, virtual_stages: int = 1) -> None:
        """Constraints between the layout and the model's shape."""
        n_experts = getattr(cfg, "n_experts", 0)
        if self.ep > 1 and n_experts <= 1:
            raise ConfigError(f"parallel.ep={self.ep} needs a mixture-of-experts model (model.n_experts > 1); "
                              "this model is dense")
        if self.ep > 1 and n_experts % self.ep:
            raise ConfigError(f"parallel.ep={self.ep} must divide model.n_experts={n_experts} (each expert-"
                              "parallel rank holds the same number of whole experts)")
        if self.tp > 1 and getattr(cfg, "kv_lora_rank", 0):
            raise ConfigError(f"parallel.tp={self.tp} is not implemented for multi-head latent attention "
                              f"(model.kv_lora_rank > 0); use fsdp and ep")
        if self.tp > 1:
            for name in ("n_heads", "n_kv_heads", "ffn_dim", "vocab_size"):
                value = getattr(cfg, name)
                if value % self.tp:
                    raise ConfigError(f"parallel.tp={self.tp} must divide model.{name}={value} (tensor "
                                      f"parallelism splits it evenly across ranks)")
        stages = self.pp * virtual_stages
        if self.pp > 1 and stages > cfg.n_layers:
            raise ConfigError(f"parallel.pp={self.pp} x parallel.pp_virtual_stages={virtual_stages} = {stages} "
                              f"pipeline stages is larger than the number of layers model.n_layers="
                              f"{cfg.n_layers}; every stage needs at least one layer")
        window = getattr(cfg, "sliding_window", None)
        if self.cp > 1 and window:
            raise ConfigError(f"parallel.cp={self.cp} does not support sliding-window attention yet "
                              f"(model.sliding_window={window}); use parallel.cp=1")
        for key, what in (("attn_softcap", "soft-capped attention scores"), ("is_mla", "latent attention")):
            if self.cp > 1 and getattr(cfg, key, None):
                raise ConfigError(f"parallel.cp={self.cp} does not support {what} yet (model.{key}="
                                  f"{getattr(cfg, key)}); use parallel.cp=1")
        if self.pp > 1 and cfg.tie_embeddings:
            raise ConfigError("pipeline parallelism (parallel.pp > 1) needs model.tie_embeddings=false: the "
                              "embedding and the output head live on different stages")

    def validate_seq_len(self, seq_len: int, sequence_parallel: bool = False) -> None:
        """Context parallelism cuts every sequence into 2 x cp equal chunks (the zigzag layout)."""
        if self.cp > 1 and seq_len % (2 * self.cp):
            raise ConfigError(f"data.seq_len={seq_len} must be a multiple of 2 x parallel.cp = {2 * self.cp} "
                              "(context parallelism splits each sequence into 2 x cp equal chunks)")
        local = seq_len // self.cp
        if self.cp > 1 and self.tp > 1 and sequence_parallel and local % self.tp:
            raise ConfigError(f"data.seq_len={seq_len} / parallel.cp={self.cp} = {local} must be a multiple of "
                              f"parallel.tp={self.tp} with parallel.sequence_parallel=true")

    def validate_batch(self, global_batch: int, micro_batch: int, pp_microbatches: int,
                       virtual_stages: int = 1) -> None:
        """Constraints between the layout and the batch sizes (micro_batch 0 = no accumulation)."""
        if global_batch % self.dp:
            raise ConfigError(f"train.global_batch_size={global_batch} is not divisible by the data-parallel "
                              f"degree {self.dp} (dp_replicate x dp_shard); use a multiple of {self.dp}")
        local = global_batch // self.dp
        per_step = micro_batch or local
        if local % per_step:
            raise ConfigError(f"train.micro_batch_size={micro_batch} must divide the per-rank batch {local} "
                              f"(global_batch_size {global_batch} / data-parallel degree {self.dp})")
        if self.pp > 1:
            stages = self.pp * virtual_stages
            n_micro = pp_microbatches or stages
            if n_micro < stages:
                raise ConfigError(f"parallel.pp_microbatches={n_micro} is fewer than the {stages} pipeline "
                                  "stages; the schedule needs at least one micro-batch per stage")
            if per_step % n_micro:
                raise ConfigError(f"parallel.pp_microbatches={n_micro} must divide the {per_step} sequences "
                                  "each rank runs per forward/backward")


def build_mesh(dims: ParallelDims, device_type: str):
    """The world's DeviceMesh with named dims (and the flattened "dp"); the process group must exist."""
    from torch.distributed.device_mesh import init_device_mesh

    names = dims.mesh_dims
    shape = tuple(getattr(dims, name) for name in names)
    mesh = init_device_mesh(device_type, shape, mesh_dim_names=names)
    if dims.ep > 1:
        mesh["efsdp", "ep"]._flatten("dp_shard")
    dp_mesh(mesh)
    if dims.cp > 1:
        dp_shard_cp_mesh(mesh)
        dp_cp_mesh(mesh)
    return mesh


def has_ep(mesh) -> bool:
    return "ep" in mesh.mesh_dim_names


def shard_dims(mesh) -> tuple[str, ...]:
    """The root mesh's dims that make up dp_shard: itself, or efsdp x ep under expert parallelism."""
    return ("efsdp", "ep") if has_ep(mesh) else ("dp_shard",)


def dp_shard_mesh(mesh):
    """The 1-D mesh of the FSDP shard ranks. Under expert parallelism "dp_shard" is flattened from efsdp x ep
    (a second `_flatten` returns the same mesh without creating process groups)."""
    return mesh["efsdp", "ep"]._flatten("dp_shard") if has_ep(mesh) else mesh["dp_shard"]


def dp_mesh(mesh):
    """The 1-D mesh of all data-parallel ranks (dp_replicate x dp_shard flattened).

    `_flatten` is private but stable since torch 2.4 (torchtitan relies on it); a second call returns the
    same mesh. Slicing "dp" from the root mesh instead is deprecated."""
    return mesh["dp_replicate", *shard_dims(mesh)]._flatten("dp")


def has_cp(mesh) -> bool:
    return mesh.size(mesh.mesh_dim_names.index("cp")) > 1


def dp_shard_cp_mesh(mesh):
    """The 1-D mesh FSDP shards over: dp_shard, or dp_shard x cp flattened under context parallelism."""
    if not has_cp(mesh):
        return dp_shard_mesh(mesh)
    return mesh[(*shard_dims(mesh), "cp")]._flatten("dp_shard_cp")


def dp_cp_mesh(mesh):
    """The 1-D mesh of every rank holding different tokens (dp_replicate x dp_shard x cp flattened): losses,
    token counts and replicated gradients are summed over it. The "dp" mesh without context parallelism."""
    if not has_cp(mesh):
        return dp_mesh(mesh)
    return mesh[("dp_replicate", *shard_dims(mesh), "cp")]._flatten("dp_cp")
