"""Mixture-of-experts training step: cybertron's `moe` preset vs `transformers` MixtralForCausalLM (the same
shape: 8 experts, 2 per token, the balancing loss on with the same weight), same initial weights, same batch,
same AdamW, one process. Interleaved round by round on CPU so machine noise hits every runner.

    python bench/moe.py                          # moe preset, batch 8 x 256, CPU
    python bench/moe.py --no-compile --rounds 3  # eager only

Runners: cybertron eager (as `cybertron train --model moe` builds it), cybertron + `train.compile`,
transformers with its default experts implementation (`grouped_mm` in transformers 5.24 where torch has it,
else its per-expert loop), transformers with `experts_implementation="eager"` (the per-expert loop), and
transformers + torch.compile. `--layouts` adds cybertron eager with its experts' CPU layout (one matmul per
expert over its rows) swapped for batched matmuls over rows padded to the busiest expert (the alternative it
was measured against)."""

from __future__ import annotations

import argparse
import statistics
import sys
import types
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_throughput import (  # noqa: E402  (bench/ is a folder of scripts)
    Result,
    Step,
    build_cybertron,
    cybertron_config,
    split_micro_batches,
    timed_round,
)

from cybertron.models.hf import config_to_hf  # noqa: E402
from cybertron.models.moe import GroupedExperts, PaddedLayout  # noqa: E402
from cybertron.pretrain import build_model_config, build_weights  # noqa: E402
from cybertron.train.optim import build_optimizer  # noqa: E402


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="moe")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=3, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--layouts", action="store_true", help="add cybertron with a loop over experts on CPU")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = p.parse_args()
    args.device, args.lr, args.fused_loss, args.fp8 = "cpu", 3e-4, False, []
    return args


def make_ours(args: argparse.Namespace, compile: bool, padded_layout: bool = False) -> Step:
    cfg = cybertron_config(args, compile)
    trainer, _ = build_cybertron(cfg)
    if padded_layout:
        for module in trainer.model.modules():
            if isinstance(module, GroupedExperts):
                module.forward = types.MethodType(_padded_forward, module)

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        trainer.train_step(0, split_micro_batches(inputs, targets, 0, torch.device("cpu")))

    return step


def _padded_forward(self: GroupedExperts, x: torch.Tensor, tokens_per_expert: torch.Tensor) -> torch.Tensor:
    return self._swiglu(x, PaddedLayout(tokens_per_expert, x.shape[0]))


def make_peer(args: argparse.Namespace, compiled: bool, experts: str | None) -> Step:
    import transformers

    cfg = cybertron_config(args, False)
    model_cfg = build_model_config(cfg, cfg.model.vocab_size)
    hf = config_to_hf(model_cfg)
    assert hf["architectures"] == ["MixtralForCausalLM"], hf["architectures"]
    hf_cfg = transformers.MixtralConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    kwargs = {} if experts is None else {"experts_implementation": experts}
    model = transformers.MixtralForCausalLM._from_config(hf_cfg, **kwargs)
    ours = build_weights(cfg, model_cfg, torch.device("cpu"))  # the same initial weights
    state = {}
    for key, value in ours.state_dict().items():
        key = key if key.startswith("lm_head") else "model." + key
        if key.endswith("experts.gate_proj"):  # transformers 5 holds experts fused: gate rows, then up
            state[key.replace("gate_proj", "gate_up_proj")] = torch.cat(
                [value, ours.state_dict()[key[len("model."):].replace("gate_proj", "up_proj")]], dim=1)
        elif not key.endswith("experts.up_proj"):
            state[key] = value
    result = model.load_state_dict(state, strict=False)
    assert not result.missing_keys and not result.unexpected_keys, result
    del ours
    model.train()
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), 1e-8)
    forward = torch.compile(model) if compiled else model

    def step(inputs: torch.Tensor, targets: torch.Tensor) -> None:
        # output_router_logits: HF adds router_aux_loss_coef x aux_loss, as cybertron adds aux_loss_coef x aux.
        loss = forward(input_ids=inputs, labels=inputs, output_router_logits=True).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def runners(args: argparse.Namespace) -> dict[str, Callable[[], Step]]:
    out: dict[str, Callable[[], Step]] = {
        "cybertron": lambda: make_ours(args, False),
        "transformers (default experts)": lambda: make_peer(args, False, None),
        "transformers (experts eager)": lambda: make_peer(args, False, "eager"),
    }
    if args.layouts:
        out["cybertron, experts padded to the busiest"] = lambda: make_ours(args, False, padded_layout=True)
    if not args.no_compile:
        out["cybertron+compile"] = lambda: make_ours(args, True)
        out["transformers+compile"] = lambda: make_peer(args, True, None)
    return out


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    vocab = build_model_config(cybertron_config(args, False), 0).vocab_size
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (args.batch, args.seq + 1), generator=g)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    steps: dict[str, Step] = {}
    for name, build in runners(args).items():
        steps[name] = build()
        timed_round(steps[name], inputs, targets, args.warmup, device)
        print(f"built and warmed up: {name}", flush=True)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(timed_round(step, inputs, targets, args.steps, device))
    results = {n: Result(args.batch * args.seq * args.steps / statistics.median(t)) for n, t in times.items()}
    print(f"\n{args.shape}, batch {args.batch} x {args.seq}, fp32, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.rounds} interleaved rounds of {args.steps} steps")
    print("| configuration | ms/step, median | ms/step, fastest round | tokens/s, median |\n| --- | --- | --- | --- |")
    for name, r in results.items():
        fastest = min(times[name]) / args.steps * 1e3
        print(f"| {name} | {args.batch * args.seq / r.tokens_per_s * 1e3:,.0f} | {fastest:,.0f} | "
              f"{r.tokens_per_s:,.0f} |")
    best_ours = max(r.tokens_per_s for n, r in results.items() if n.startswith("cybertron"))
    best_peer = max(r.tokens_per_s for n, r in results.items() if n.startswith("transformers"))
    eager_peer = max(r.tokens_per_s for n, r in results.items() if n.startswith("transformers (")
                     )
    print(f"\nbest vs best: {best_ours / best_peer:.3f}; cybertron eager vs transformers eager (its faster "
          f"experts implementation): {results['cybertron'].tokens_per_s / eager_peer:.3f}")


if __name__ == "__main__":
    main()
