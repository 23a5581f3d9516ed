"""plan(): every runnable layout with its predicted memory and relative time, best first."""

from __future__ import annotations

from dataclasses import dataclass

from cybertron.models.config import ModelConfig
from cybertron.plan.layouts import Layout, candidate_layouts
from cybertron.plan.memory import GPU_OVERHEAD, MemoryEstimate, estimate
from cybertron.plan.timing import Hardware, time_per_token


@dataclass(frozen=True)
class PlanRow:
    layout: Layout
    memory: MemoryEstimate
    time_per_token: float  # modelled seconds per token of the whole world (timing.py)
    relative_time: float  # time_per_token / the best fitting layout's (1.0 = the fastest)
    fits: bool


def plan(cfg: ModelConfig, world_size: int, seq_len: int, gpu_memory: float, micro_batches: list[int],
         dtype: str = "bf16", optimizer: str = "adamw", method: str = "full",
         checkpointing: tuple[str, ...] = ("none", "full"), overhead: float = GPU_OVERHEAD,
         hw: Hardware | None = None) -> list[PlanRow]:
    """Layouts that cybertron can run, fitting ones first (fastest first), then the rest by memory."""
    hw = hw or Hardware()
    rows = []
    for layout in candidate_layouts(cfg, world_size, seq_len, micro_batches, checkpointing):
        mem = estimate(cfg, layout, seq_len, dtype, optimizer, method, overhead)
        rows.append((layout, mem, time_per_token(cfg, layout, seq_len, dtype, hw)))
    fitting = [t for _, mem, t in rows if mem.total <= gpu_memory]
    best = min(fitting) if fitting else min((t for _, _, t in rows), default=1.0)
    out = [PlanRow(layout, mem, t, t / best, mem.total <= gpu_memory) for layout, mem, t in rows]
    # fitting first, fastest first; among equal times the smaller memory
    return sorted(out, key=lambda r: (not r.fits, r.relative_time if r.fits else r.memory.total, r.memory.total))
