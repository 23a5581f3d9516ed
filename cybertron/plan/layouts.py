"""The layouts cybertron can run for a model on N ranks: every factorisation of the world into pp x
dp_replicate x dp_shard x cp x tp (x ep borrowed from dp_shard), each ZeRO stage, activation checkpointing on
or off, checked by the very validators `cybertron train` runs (parallel/runtime.layout_dims), so a layout the
planner prints is one the trainer accepts."""

from __future__ import annotations

from dataclasses import dataclass, replace
from types import SimpleNamespace

from cybertron.config import ParallelSection, TrainSection
from cybertron.errors import ConfigError
from cybertron.models.config import ModelConfig
from cybertron.parallel.dims import ParallelDims


@dataclass(frozen=True)
class Layout:
    """One candidate: the parallel degrees, the ZeRO stage, checkpointing and the batch each rank runs.
    micro_batch: sequences per forward (per pipeline micro-batch under pp); pp_microbatches: micro-batches the
    pipeline schedule runs per step (1 without pp)."""

    dims: ParallelDims
    activation_checkpoint: str = "none"
    micro_batch: int = 1
    pp_microbatches: int = 1

    @classmethod
    def from_fields(cls, world_size: int, fields: dict, micro_batch: int) -> Layout:
        """The layout a [parallel] section describes, with `micro_batch` sequences per rank per step (split into
        the pipeline's default micro-batches, one per stage, under pp)."""
        p = replace(ParallelSection(), **fields)
        dims = ParallelDims.resolve(world_size, p.dp_replicate, p.dp_shard, p.tp, p.pp, p.data_parallel, cp=p.cp,
                                    ep=p.ep)
        m = (p.pp_microbatches or p.pp) if p.pp > 1 else 1
        return cls(dims, p.activation_checkpoint, micro_batch // m, m)

    @property
    def sequences_per_step(self) -> int:
        """Sequences one data-parallel rank runs per forward/backward (all pipeline micro-batches)."""
        return self.micro_batch * self.pp_microbatches

    @property
    def zero(self) -> str:
        """The data-parallel scheme in the usual names."""
        d = self.dims
        if d.dp * d.cp == 1:
            return "none"
        if d.data_parallel == "zero3" and d.dp_replicate > 1 and d.dp_shard * d.cp > 1:
            return "hsdp"
        return {"ddp": "ddp", "zero1": "zero1", "zero2": "zero2", "zero3": "fsdp"}[d.data_parallel]

    def parallel_fields(self) -> dict:
        """The [parallel] keys that select this layout in `cybertron train`."""
        d = self.dims
        out = {"data_parallel": d.data_parallel, "dp_replicate": d.dp_replicate, "dp_shard": d.dp_shard,
               "tp": d.tp, "pp": d.pp, "cp": d.cp, "ep": d.ep, "activation_checkpoint": self.activation_checkpoint}
        if d.pp > 1:
            out["pp_microbatches"] = self.pp_microbatches
        return out

    def name(self) -> str:
        """e.g. fsdp4-tp2, ddp8, hsdp2x4, zero2:4-cp2, single."""
        d = self.dims
        if self.zero == "hsdp":
            parts = [f"hsdp{d.dp_replicate}x{d.dp_shard}"]
        elif self.zero in ("zero1", "zero2"):
            parts = [f"{self.zero}:{d.dp}"]
        elif d.dp > 1:
            parts = [f"{self.zero}{d.dp}"]
        else:
            parts = []
        parts += [f"{key}{getattr(d, key)}" for key in ("tp", "pp", "cp", "ep") if getattr(d, key) > 1]
        return "-".join(parts) or "single"


def _divisors(n: int) -> list[int]:
    return [k for k in range(1, n + 1) if n % k == 0]


def candidate_layouts(cfg: ModelConfig, world_size: int, seq_len: int, micro_batches: list[int],
                      checkpointing: tuple[str, ...] = ("none", "full")) -> list[Layout]:
    """Every layout of `world_size` ranks that cybertron's validators accept for this model and sequence
    length (sequence parallelism and loss parallelism on, as cybertron's defaults; 1F1B with 2 x pp
    micro-batches under pp)."""
    out = []
    for tp in _divisors(world_size):
        for pp in _divisors(world_size // tp):
            for cp in _divisors(world_size // (tp * pp)):
                dp = world_size // (tp * pp * cp)
                for layout in _data_parallel_variants(dp, tp, pp, cp, cfg):
                    for ac in checkpointing:
                        for mb in micro_batches:
                            candidate = _accepted(cfg, world_size, seq_len, {**layout, "tp": tp, "pp": pp,
                                                                             "cp": cp}, ac, mb)
                            if candidate is not None:
                                out.append(candidate)
    return out


def _data_parallel_variants(dp: int, tp: int, pp: int, cp: int, cfg: ModelConfig) -> list[dict]:
    """ddp / zero1 / zero2 / zero3 over the dp ranks, HSDP splits, and expert-parallel degrees for MoE."""
    variants = [{"data_parallel": "zero3", "dp_replicate": 1, "dp_shard": dp}]
    if dp * cp > 1:
        # ddp / zero1 do not compose with tp / pp (runtime.layout_dims refuses them with dp > 1; with dp 1 and
        # cp > 1 it lets them through, but DDP over DTensor or pipeline stages is not a path cybertron tests)
        replicated = ("ddp", "zero1") if tp == 1 and pp == 1 else ()
        variants += [{"data_parallel": z, "dp_replicate": 1, "dp_shard": dp} for z in (*replicated, "zero2")]
        variants += [{"data_parallel": "zero3", "dp_replicate": r, "dp_shard": dp // r}
                     for r in _divisors(dp) if 1 < r < dp]
    out = []
    for v in variants:
        out.append({**v, "ep": 1})
        if cfg.n_experts > 1:
            out += [{**v, "ep": ep} for ep in _divisors(v["dp_shard"]) if ep > 1]
    return out


def _accepted(cfg: ModelConfig, world_size: int, seq_len: int, fields: dict, ac: str, micro_batch: int
              ) -> Layout | None:
    # late: runtime imports torch, which a mistyped flag should not wait for
    from cybertron.parallel.runtime import layout_dims

    pp = fields["pp"]
    m = 2 * pp if pp > 1 else 1
    parallel = replace(ParallelSection(), **fields, activation_checkpoint=ac, pp_microbatches=m if pp > 1 else 0)
    dp = world_size // (fields["tp"] * pp * fields["cp"])
    train = replace(TrainSection(), global_batch_size=dp * micro_batch * m, micro_batch_size=0)
    run = SimpleNamespace(parallel=parallel, train=train, data=SimpleNamespace(seq_len=seq_len))
    try:
        dims = layout_dims(run, world_size, cfg)
    except ConfigError:
        return None
    return Layout(dims, ac, micro_batch, m)
