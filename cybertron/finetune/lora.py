"""LoRA and DoRA by module swap, merge, and switching adapters off.

`apply_lora` replaces matching `nn.Linear` modules with a `LoRALinear` that keeps the frozen base weight
under the same name (`<fqn>.weight`, so Hugging Face key names still apply to the base) and adds the
trainable `lora_A` (rank, in), `lora_B` (out, rank) and, for DoRA, `magnitude` (out,):

    LoRA:  y = x W^T + b + s * dropout(x) A^T B^T                       s = alpha / rank
    DoRA:  y = m / ||W + s B A||_row * (W + s B A) x + b   (the norm is detached, as in the DoRA paper)

B starts at zero and m at ||W||_row, so a fresh adapter leaves the model's output unchanged.
"""

from __future__ import annotations

import contextlib
import fnmatch
import math
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from cybertron.errors import ConfigError
from cybertron.finetune.lora_experts import PROJECTIONS, LoRAExperts
from cybertron.models.moe import GroupedExperts

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class LoRASpec:
    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: list(DEFAULT_TARGETS))
    dora: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


class LoRALinear(nn.Module):
    """A frozen linear layer plus a low-rank update (and a DoRA magnitude when `dora`)."""

    # The role of each parameter's dimensions, which tensor parallelism reads to split the layer the way its
    # plan splits the Linear it replaced (parallel/tensor_parallel.py): column-parallel shards every "out"
    # dimension (B by rows, A replicated), row-parallel every "in" dimension (A by columns, B replicated).
    param_axes = {"weight": ("out", "in"), "bias": ("out",), "lora_A": ("rank", "in"), "lora_B": ("out", "rank"),
                  "magnitude": ("out",)}

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, dora: bool = False,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = nn.Parameter(base.weight.detach(), requires_grad=False)
        self.bias = None if base.bias is None else nn.Parameter(base.bias.detach(), requires_grad=False)
        self.rank, self.scale = rank, alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # Adapters are trained, so they stay fp32 (master weights) even over a bf16 or NF4 base.
        device = base.weight.device
        self.lora_A = nn.Parameter(_kaiming_uniform((rank, self.in_features), generator).to(device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=device))
        self.disabled = False  # True inside `adapters_disabled`: the layer is its base alone
        # finetune.quant stores the base weight in NF4 and sets its matmul here (this module never imports it)
        self.quantized = False
        self.base_linear: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = F.linear
        self.magnitude = nn.Parameter(self.weight.detach().float().norm(dim=1)) if dora else None

    def base_weight(self) -> torch.Tensor:
        """The base weight as a plain tensor (dequantized when stored in NF4)."""
        return self.weight.to(self.lora_A.dtype) if self.quantized else self.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base_linear(x, self.weight)
        if not self.disabled:
            a, b = self.lora_A.to(x.dtype), self.lora_B.to(x.dtype)
            lora = F.linear(F.linear(self.dropout(x), a), b) * self.scale
            if self.magnitude is None:
                base = base + lora
            else:
                # m / ||W + sBA|| rescales the merged weight's output rows: (W + sBA) x = base + lora.
                norm_scale = (self.magnitude / self._merged_row_norm()).to(x.dtype)
                base = norm_scale * (base + lora)
        return base if self.bias is None else base + self.bias

    def _merged_row_norm(self) -> torch.Tensor:
        # Detached: DoRA's gradient treats the norm as a constant (paper section 4.3), which saves memory.
        with torch.no_grad():
            delta = (self.lora_B.float() @ self.lora_A.float()) * self.scale
            return (self.base_weight().float() + delta).norm(dim=1)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The plain weight this layer computes with: W + s B A (DoRA: rescaled to the magnitude), fp32."""
        merged = self.base_weight().float() + (self.lora_B.float() @ self.lora_A.float()) * self.scale
        if self.magnitude is not None:
            merged = merged * (self.magnitude.float() / merged.norm(dim=1))[:, None]
        return merged

    def extra_repr(self) -> str:
        kind = "dora" if self.magnitude is not None else "lora"
        return f"{self.in_features}, {self.out_features}, {kind} rank={self.rank}, scale={self.scale:g}"


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator | None) -> torch.Tensor:
    # nn.Linear's default init (kaiming_uniform with a=sqrt(5)), as PEFT uses for lora_A: bound 1/sqrt(in).
    bound = 1.0 / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def matches(fqn: str, patterns: list[str]) -> bool:
    """A pattern names a module by its last name (`q_proj`) or by an fnmatch glob of its full name
    (`layers.*.self_attn.q_proj`)."""
    last = fqn.rsplit(".", 1)[-1]
    return any(last == p or fnmatch.fnmatchcase(fqn, p) for p in patterns)


def apply_lora(model: nn.Module, spec: LoRASpec, seed: int = 0) -> list[str]:
    """Swap every matching nn.Linear for a LoRALinear, freeze everything but the adapters, and return the
    names swapped. ConfigError when a pattern matches nothing (a typo would otherwise train nothing)."""
    if spec.rank < 1:
        raise ConfigError(f"finetune.rank must be >= 1, got {spec.rank}")
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    # Mixture-of-experts projections are stacked parameters, not linears; a target names them the same way.
    experts = [name for name, m in model.named_modules() if isinstance(m, GroupedExperts)]
    expert_projections = [f"{name}.{proj}" for name in experts for proj in PROJECTIONS]
    for pattern in spec.targets:
        if not any(matches(name, [pattern]) for name in linears + expert_projections):
            names = sorted({n.rsplit(".", 1)[-1] for n in linears + expert_projections})
            raise ConfigError(f"finetune.targets: {pattern!r} matches no linear layer; layer names are {names}")
    targeted_experts = [p for p in expert_projections if matches(p, spec.targets)]
    if targeted_experts and spec.dora:
        raise ConfigError(f"finetune.dora is not implemented for expert weights ({targeted_experts[0]}); use LoRA "
                          f"or leave the experts out of finetune.targets")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    swapped = [name for name in linears if matches(name, spec.targets)]
    for name in swapped:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, LoRALinear(getattr(parent, child), spec.rank, spec.alpha, spec.dropout, spec.dora,
                                          generator))
    for name in experts:
        projections = [p for p in PROJECTIONS if f"{name}.{p}" in targeted_experts]
        if projections:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child,
                    LoRAExperts(getattr(model.get_submodule(parent_name), child), projections, spec.rank, spec.alpha,
                                generator))
    return swapped + targeted_experts


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def lora_expert_modules(model: nn.Module) -> Iterator[tuple[str, LoRAExperts]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRAExperts):
            yield name, module


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model (e.g. as the frozen reference in DPO) without copying it."""
    layers = [m for _, m in lora_modules(model)] + [m for _, m in lora_expert_modules(model)]
    previous = [m.disabled for m in layers]
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m, was in zip(layers, previous):
            m.disabled = was


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The plain model's state dict (our keys): every LoRALinear folded into `<fqn>.weight`."""
    state = {}
    adapted = dict(lora_modules(model))
    experts = dict(lora_expert_modules(model))
    for key, value in model.state_dict().items():
        module_name, _, leaf = key.rpartition(".")
        if module_name in experts and leaf in PROJECTIONS:
            state[key] = experts[module_name].merged_weight(leaf)
            continue
        if any(key.startswith(f"{name}.lora_") for name in experts):
            continue  # folded into the expert weights
        if module_name in adapted:
            if leaf == "weight":
                state[key] = adapted[module_name].merged_weight()
            elif leaf == "bias":
                state[key] = value
            continue  # lora_A / lora_B / magnitude are folded in
        state[key] = value
    return state


@torch.no_grad()
def merge_lora_(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear with a plain nn.Linear holding its merged weight (for serving)."""
    for name, module in list(lora_modules(model)):
        parent_name, _, child = name.rpartition(".")
        weight = module.merged_weight()
        linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None,
                           device=weight.device, dtype=weight.dtype)
        linear.weight.copy_(weight)
        if module.bias is not None:
            linear.bias.copy_(module.bias)
        setattr(model.get_submodule(parent_name), child, linear)
    for name, module in list(lora_expert_modules(model)):
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, module.merged())
    return model


def trainable_view(model: nn.Module) -> nn.Module:
    """A module tree holding only the trainable parameters of `model`, as the *same* tensors under the *same*
    names. Checkpointing it saves and restores the adapters (and their optimizer state) alone."""
    view = nn.Module()
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        *path, leaf = name.split(".")
        node = view
        for part in path:
            if not hasattr(node, part):
                node.add_module(part, nn.Module())
            node = getattr(node, part)
        node.register_parameter(leaf, param)
    return view


def count_params(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
