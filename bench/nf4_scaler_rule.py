"""Dequantized NF4 error of the scaler-block rule in finetune/quant.py (groups laid out for 8 equal shards,
so ZeRO-3 can split the base) against the rule before it (the largest divisor <= 256 of the block count).

    python bench/nf4_scaler_rule.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cybertron.finetune import quant  # noqa: E402
from cybertron.finetune.lora import LoRASpec, apply_lora, lora_modules  # noqa: E402
from cybertron.models.llama import build_model  # noqa: E402
from cybertron.models.presets import preset_config  # noqa: E402


def old_rule(n_blocks: int) -> int:
    return next(s for s in range(min(quant.MAX_SCALER_BLOCK, n_blocks), 0, -1) if n_blocks % s == 0)


def error(weight: torch.Tensor, scaler_block: int) -> tuple[torch.Tensor, int]:
    q = quant._nf4().to_nf4(weight.contiguous(), quant.DEFAULT_BLOCK_SIZE, scaler_block)
    return (q.get_original_weight() - weight).flatten(), quant.nf4_storage_bytes(q)


def main() -> None:
    model = build_model(preset_config("debug", vocab_size=256), seed=0)
    apply_lora(model, LoRASpec(rank=4, alpha=8.0), seed=0)
    weights = [m.weight.detach() for _, m in lora_modules(model)]
    n = sum(w.numel() for w in weights)
    print(f"debug preset, {len(weights)} adapted weights, {n} values")
    print("| rule | mean abs error | max abs error | rms error | bits/weight |\n|---|---|---|---|---|")
    for name, rule in (("old (divides n_blocks)", old_rule), ("new (divides n_blocks / 8)", quant._scaler_block)):
        parts = [error(w, rule(w.numel() // quant.DEFAULT_BLOCK_SIZE)) for w in weights]
        err = torch.cat([e for e, _ in parts]).double()
        bits = 8 * sum(b for _, b in parts) / n
        print(f"| {name} | {err.abs().mean():.6e} | {err.abs().max():.6e} | {err.pow(2).mean().sqrt():.6e} "
              f"| {bits:.4f} |")
    for shape in [(4096, 4096), (14336, 4096), (1024, 4096), (128256, 64)]:
        n_blocks = shape[0] * shape[1] // quant.DEFAULT_BLOCK_SIZE
        print(f"{shape}: scaler block old {old_rule(n_blocks)}, new {quant._scaler_block(n_blocks)}")


if __name__ == "__main__":
    main()
