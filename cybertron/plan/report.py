"""`cybertron plan`'s output: a memory string parser, the table and the JSON."""

from __future__ import annotations

import json
import re

from cybertron.errors import UserError
from cybertron.plan.planner import PlanRow

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str, flag: str = "--gpu-memory", allow_zero: bool = False) -> float:
    """'80GiB', '80GB', '141 GB', '1.5TiB' -> bytes (a bare number is bytes)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS or float(match.group(1)) < 0 or (float(match.group(1)) == 0 and not allow_zero):
        raise UserError(f"{flag} {text!r} is not a memory size; write e.g. 80GiB, 141GB or 24GiB")
    return float(match.group(1)) * _UNITS[unit]


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f}"


def table(rows: list[PlanRow], limit: int) -> str:
    head = ("layout", "zero", "dp_rep", "dp_shard", "tp", "pp", "cp", "ep", "ac", "mbs", "params", "grads",
            "optim", "activ", "transient", "total GiB", "rel time")
    lines = []
    for r in rows[:limit] if limit else rows:
        d, m = r.layout.dims, r.memory
        lines.append((r.layout.name(), r.layout.zero, str(d.dp_replicate), str(d.dp_shard), str(d.tp), str(d.pp),
                      str(d.cp), str(d.ep), r.layout.activation_checkpoint, str(r.layout.micro_batch),
                      _gib(m.params), _gib(m.grads), _gib(m.optim), _gib(m.activations),
                      _gib(m.transient + m.overhead), _gib(m.total) + ("" if r.fits else " !"),
                      f"{r.relative_time:.2f}"))
    widths = [max(len(h), *(len(line[i]) for line in lines)) if lines else len(h) for i, h in enumerate(head)]
    fmt = lambda cols: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cols, widths)))
    return "\n".join([fmt(head), *(fmt(line) for line in lines)])


def as_json(rows: list[PlanRow]) -> str:
    return json.dumps([{"layout": r.layout.name(), "zero": r.layout.zero, "fits": r.fits,
                        "parallel": r.layout.parallel_fields(), "micro_batch": r.layout.micro_batch,
                        "memory_bytes": {k: round(v) for k, v in r.memory.as_dict().items()},
                        "relative_time": round(r.relative_time, 4)} for r in rows], indent=1)
