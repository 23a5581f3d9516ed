"""Several LoRA/DoRA adapters over one base model, chosen per batch row, in one forward.

`attach_adapters(model, adapters)` swaps each Linear that some adapter adapts for a `MultiLoRALinear` that
keeps the base weight (same parameter, same name) and holds every adapter's update for that layer stacked
into padded tensors, slot 0 being "no adapter" (all zeros), r the largest rank of any adapter:

    a     (n + 1, in, r)        A^T of each adapter, zero-padded to rank r
    a_cat (in, (n + 1) r)       the same side by side (a second copy: the layout the dense path multiplies by)
    b     (n + 1, r, out)       (s B)^T with the scale s = alpha / rank folded in
    dora  (n + 1, out) or None  DoRA's m / ||W + s B A||_row (ones where an adapter is plain LoRA or absent)

Before every model call the engine writes each batch row's adapter slot into the `AdapterRows` object that all
wrappers share (given to each at wrap time: no global state). A wrapper then computes every row at once,
y = dora[idx] * (x W^T + delta) + bias, with delta in one of two exact ways:

    gather  bmm(bmm(x, a[idx]), b[idx])           each row reads its own adapter (punica's BGMV shape)
    dense   ((x @ a_cat) * onehot(idx)) @ b.view((n+1) r, out)
            all loaded adapters in two plain matmuls, the row's own rank block kept by a 0/1 mask

Both read no device value on the host and loop over neither rows nor adapters in Python, so CUDA graphs capture
either (decode_graphs.py passes the slots as a column of its static input). Gather moves B x r x (in + out)
weights per call, dense (n + 1) x r x (in + out): dense is taken while fewer adapters are loaded than the call has
rows (bench/RESULTS.md, "Serving v2: multi-LoRA", measures both). Padding ranks with zeros adds exactly 0, and
so does a masked block (its h is finite), so a base row gets the base model's output; when no row of a call uses
an adapter the index is None and the wrappers are plain Linears.

This module works on plain tensors (`LoraAdapter`); reading adapters from PEFT directories and fine-tuning runs
is runs.py's job.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cybertron.errors import UserError


@dataclass(frozen=True)
class LoraLayer:
    """One adapted Linear: A (rank, in), B (out, rank) with the scale alpha / rank already folded into B, and
    for DoRA the magnitude m (out,)."""

    a: torch.Tensor
    b: torch.Tensor
    magnitude: torch.Tensor | None = None


@dataclass(frozen=True)
class LoraAdapter:
    """An adapter to serve under `name`: its layers by full module name in the base (`layers.0.self_attn.q_proj`)."""

    name: str
    layers: dict[str, LoraLayer]
    trained_on: str | None = None  # the base it was trained over, as its files record it (a path or a hub id)


class AdapterRows:
    """Which adapter each row of the next model call uses, set by the engine before each call and read by every
    MultiLoRALinear: `index` (B,) int64 slots on the model's device, or None when every row is the base; `mask`
    (B, (n + 1) r) the rows' one-hot slots widened to rank blocks (the dense path's); `path` gather or dense."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self.path = "gather"


class MultiLoRALinear(nn.Module):
    """A frozen Linear plus, per batch row, that row's adapter update (see the module docstring)."""

    def __init__(self, base: nn.Linear, a: torch.Tensor, b: torch.Tensor, dora: torch.Tensor | None,
                 rows: AdapterRows):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same parameters: the model's state dict is unchanged
        self.bias = base.bias
        # Not persistent: a checkpoint of the served model is the base's.
        self.register_buffer("a", a, persistent=False)
        self.register_buffer("a_cat", a.permute(1, 0, 2).flatten(1).contiguous(), persistent=False)
        self.register_buffer("b", b, persistent=False)
        self.register_buffer("dora", dora, persistent=False)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        index = self.rows.index
        if index is not None:
            n = x.shape[0]  # rows: (B, T, in) in the decoder, (B, in) at the output head with logits_at
            broadcast = (n, *[1] * (x.dim() - 2), -1)  # a per-row vector over every position of the row
            if self.rows.path == "dense":
                h = (x @ self.a_cat) * self.rows.mask.view(broadcast)  # (B, T, (n+1) r)
                y = torch.addmm(y.flatten(0, -2), h.flatten(0, -2), self.b.flatten(0, 1)).view(y.shape)
            else:
                h = torch.bmm(x.reshape(n, -1, self.in_features), self.a[index])  # (B, T, r)
                y = y + torch.bmm(h, self.b[index]).view(y.shape)
            if self.dora is not None:
                y = y * self.dora[index].view(broadcast)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, adapters={self.b.shape[0] - 1}, rank={self.b.shape[1]}, "
                f"dora={self.dora is not None}")


class MultiLoRA:
    """The adapters attached to a model: their names (slot i + 1 is names[i]) and the rows object the engine
    sets before each model call. `path` (auto, gather or dense) fixes how wrappers compute; auto picks per call."""

    def __init__(self, names: list[str], rows: AdapterRows, rank: int, weight: torch.Tensor, path: str = "auto"):
        assert path in ("auto", "gather", "dense"), path
        self.names, self.rows, self.rank, self.path = names, rows, rank, path
        self.device, self.dtype = weight.device, weight.dtype
        self._slots = {name: i + 1 for i, name in enumerate(names)}
        # The slot of each column of the dense path's stacked ranks: a row's mask is (its slot == column's slot),
        # compared on the device (one_hot would check its input's range on the host).
        self._columns = torch.arange(len(names) + 1, device=self.device).repeat_interleave(rank)

    def slot(self, name: str | None) -> int:
        """0 for the base (None), else the adapter's slot (the engine checks the name first)."""
        return 0 if name is None else self._slots[name]

    def select(self, slots: Sequence[int]) -> None:
        """The adapter slot of each row of the next model call (one small host -> device copy)."""
        if not any(slots):
            self.rows.index = self.rows.mask = None
            return
        self.bind(torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True))

    def bind(self, index: torch.Tensor) -> None:
        """Rows' slots already on the device, (B,) int64: a decode graph binds a column of its static input
        buffer, so each replay reads the slots copied in for that step. Nothing here reads the values."""
        rows = self.rows
        rows.index = index
        dense = len(self.names) < index.shape[0] if self.path == "auto" else self.path == "dense"
        rows.path = "dense" if dense else "gather"
        rows.mask = (index[:, None] == self._columns).to(self.dtype) if dense else None


def attach_adapters(model: nn.Module, adapters: Sequence[LoraAdapter], path: str = "auto") -> MultiLoRA:
    """Wrap every Linear of `model` that some adapter adapts (in place) and return the handle that selects rows.
    UserError (one line) when an adapter names a module the base lacks or a shape differs from the base's."""
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise UserError(f"adapter names must be unique, got {names}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for adapter in adapters:
        for module, layer in adapter.layers.items():
            _check_layer(adapter.name, module, layer, linears.get(module))
    # One rank for every layer, so one mask per call serves every wrapper's dense path.
    rank = max(layer.a.shape[0] for adapter in adapters for layer in adapter.layers.values())
    rows = AdapterRows()
    for module in [m for m in linears if any(m in a.layers for a in adapters)]:
        base = linears[module]
        a, b, dora = stack_layer(base, [a.layers.get(module) for a in adapters], rank, base.weight.dtype)
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent), child, MultiLoRALinear(base, a, b, dora, rows))
    return MultiLoRA(names, rows, rank, next(model.parameters()), path)


def _check_layer(adapter: str, module: str, layer: LoraLayer, base: nn.Linear | None) -> None:
    if base is None:
        raise UserError(f"adapter {adapter!r} adapts {module}, which is not a linear layer of the base model; "
                        "it was made for another model")
    rank = layer.a.shape[0]
    want = {"A": (rank, base.in_features), "B": (base.out_features, rank), "magnitude": (base.out_features,)}
    for what, tensor in (("A", layer.a), ("B", layer.b), ("magnitude", layer.magnitude)):
        if tensor is not None and tuple(tensor.shape) != want[what]:
            raise UserError(f"adapter {adapter!r}: {module} {what} has shape {tuple(tensor.shape)} but the base "
                            f"needs {want[what]}; it was made for another model")


@torch.no_grad()
def stack_layer(base: nn.Linear, layers: Sequence[LoraLayer | None], rank: int,
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a, b, dora) for one base Linear from each adapter's layer (None: the adapter leaves it alone)."""
    device = base.weight.device
    n = len(layers) + 1
    a = torch.zeros(n, base.in_features, rank, device=device, dtype=dtype)
    b = torch.zeros(n, rank, base.out_features, device=device, dtype=dtype)
    any_dora = any(layer is not None and layer.magnitude is not None for layer in layers)
    dora = torch.ones(n, base.out_features, device=device, dtype=dtype) if any_dora else None
    for slot, layer in enumerate(layers, start=1):
        if layer is None:
            continue
        r = layer.a.shape[0]
        a[slot, :, :r] = layer.a.t().to(device, dtype)
        b[slot, :r, :] = layer.b.t().to(device, dtype)
        if layer.magnitude is not None:
            dora[slot] = dora_scale(base.weight, layer).to(dtype)
    return a, b, dora


def dora_scale(weight: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
    """m / ||W + s B A||_row in fp32: what DoRA multiplies the merged layer's output by (constant at inference)."""
    merged = weight.float() + layer.b.float().to(weight.device) @ layer.a.float().to(weight.device)
    return layer.magnitude.float().to(weight.device) / merged.norm(dim=1)
