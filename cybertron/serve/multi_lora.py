"""Several LoRA/DoRA adapters over one base model, chosen per batch row, in one forward.

`attach_adapters(model, adapters)` swaps each Linear that some adapter adapts for a `MultiLoRALinear` that
keeps the base weight (same parameter, same name) and holds every adapter's update for that layer stacked
into padded tensors, slot 0 being "no adapter":

    a_t  (n + 1, in, r_max)     A^T of each adapter, zero-padded to the largest rank (zeros for slot 0)
    b_t  (n + 1, r_max, out)    (s B)^T with the scale s = alpha / rank folded in
    dora (n + 1, out) or None   DoRA's m / ||W + s B A||_row (ones where an adapter is plain LoRA or absent)

Before every model call the engine writes one adapter index per batch row into the `AdapterRows` object that
all wrappers share (given to each at wrap time: no global state). A wrapper then computes, for all rows at once,

    y = dora[idx] * (x W^T + bmm(bmm(x, a_t[idx]), b_t[idx])) + bias

with batched gathers and two bmm calls: each row reads its own adapter's weights (punica's BGMV shape), and
nothing on this path loops over rows or adapters in Python or reads a device value on the host. Padding ranks
with zeros changes nothing (0 * x adds exactly 0), and a row of slot 0 adds exactly 0 (times a DoRA scale of
exactly 1), so base rows get the base model's output. When no row of a call uses an adapter the index is None
and the wrappers are plain Linears.

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


class AdapterRows:
    """Which adapter each row of the next model call uses: (B,) int64 slot indices on the model's device, or None
    when every row is the base. Set by the engine before each call; read by every MultiLoRALinear."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None


class MultiLoRALinear(nn.Module):
    """A frozen Linear plus, per batch row, that row's adapter update (see the module docstring)."""

    def __init__(self, base: nn.Linear, a_t: torch.Tensor, b_t: torch.Tensor, dora: torch.Tensor | None,
                 rows: AdapterRows):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight  # the same parameters: the model's state dict is unchanged
        self.bias = base.bias
        # Not persistent: a checkpoint of the served model is the base's.
        self.register_buffer("a_t", a_t, persistent=False)
        self.register_buffer("b_t", b_t, persistent=False)
        self.register_buffer("dora", dora, persistent=False)
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight)
        index = self.rows.index
        if index is not None:
            n = x.shape[0]  # rows: (B, T, in) in the decoder, (B, in) at the output head with logits_at
            h = torch.bmm(x.reshape(n, -1, self.in_features), self.a_t[index])  # (B, T, r_max)
            y = y + torch.bmm(h, self.b_t[index]).view(y.shape)  # (B, T, out)
            if self.dora is not None:
                y = y * self.dora[index].view(n, *[1] * (y.dim() - 2), self.out_features)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"{self.in_features}, {self.out_features}, adapters={self.a_t.shape[0] - 1}, "
                f"r_max={self.a_t.shape[2]}, dora={self.dora is not None}")


class MultiLoRA:
    """The adapters attached to a model: their names (slot i + 1 is names[i]) and the rows object the engine
    sets before each model call."""

    def __init__(self, names: list[str], rows: AdapterRows, device: torch.device):
        self.names, self.rows, self.device = names, rows, device
        self._slots = {name: i + 1 for i, name in enumerate(names)}

    def slot(self, name: str | None) -> int:
        """0 for the base (None), else the adapter's slot (the engine checks the name first)."""
        return 0 if name is None else self._slots[name]

    def select(self, slots: Sequence[int]) -> None:
        """The adapter slot of each row of the next model call (one small host -> device copy)."""
        self.rows.index = None if not any(slots) else \
            torch.tensor(slots, dtype=torch.int64).to(self.device, non_blocking=True)


def attach_adapters(model: nn.Module, adapters: Sequence[LoraAdapter]) -> MultiLoRA:
    """Wrap every Linear of `model` that some adapter adapts (in place) and return the handle that selects rows.
    UserError (one line) when an adapter names a module the base lacks or a shape differs from the base's."""
    names = [a.name for a in adapters]
    if len(set(names)) != len(names):
        raise UserError(f"adapter names must be unique, got {names}")
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    for adapter in adapters:
        for module, layer in adapter.layers.items():
            _check_layer(adapter.name, module, layer, linears.get(module))
    weight = next(model.parameters())
    rows = AdapterRows()
    targets = [m for m in linears if any(m in a.layers for a in adapters)]
    for module in targets:
        base = linears[module]
        per_adapter = [a.layers.get(module) for a in adapters]
        a_t, b_t, dora = stack_layer(base, per_adapter, base.weight.dtype)
        parent, _, child = module.rpartition(".")
        setattr(model.get_submodule(parent), child, MultiLoRALinear(base, a_t, b_t, dora, rows))
    return MultiLoRA(names, rows, weight.device)


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
def stack_layer(base: nn.Linear, layers: Sequence[LoraLayer | None],
                dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(a_t, b_t, dora) for one base Linear from each adapter's layer (None: the adapter leaves it alone)."""
    device = base.weight.device
    r_max = max(layer.a.shape[0] for layer in layers if layer is not None)
    n = len(layers) + 1
    a_t = torch.zeros(n, base.in_features, r_max, device=device, dtype=dtype)
    b_t = torch.zeros(n, r_max, base.out_features, device=device, dtype=dtype)
    any_dora = any(layer is not None and layer.magnitude is not None for layer in layers)
    dora = torch.ones(n, base.out_features, device=device, dtype=dtype) if any_dora else None
    for slot, layer in enumerate(layers, start=1):
        if layer is None:
            continue
        r = layer.a.shape[0]
        a_t[slot, :, :r] = layer.a.t().to(device, dtype)
        b_t[slot, :r, :] = layer.b.t().to(device, dtype)
        if layer.magnitude is not None:
            dora[slot] = dora_scale(base.weight, layer).to(dtype)
    return a_t, b_t, dora


def dora_scale(weight: torch.Tensor, layer: LoraLayer) -> torch.Tensor:
    """m / ||W + s B A||_row in fp32: what DoRA multiplies the merged layer's output by (constant at inference)."""
    merged = weight.float() + layer.b.float().to(weight.device) @ layer.a.float().to(weight.device)
    return layer.magnitude.float().to(weight.device) / merged.norm(dim=1)
