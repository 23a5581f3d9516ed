"""The training stall of a checkpoint save: synchronous (checkpoint.async_save=false) vs DCP async_save with staging
(the default), through the training driver's CheckpointSaver, on CPU.

    python bench/checkpoint_stall.py                    # ~30M parameters, 24 steps, a save every 6, 2 rounds
    python bench/checkpoint_stall.py --dim 256 --layers 4 --steps 12 --every 4 --rounds 1   # quick look

Each round runs the same training three ways, interleaved so machine noise hits all of them: without saves,
with synchronous saves and with asynchronous saves (every --every steps, published with their manifest,
keep=1; the last step saves too, as a run's end does). Reported per mode: the median training step, the
stall per save (median time training waits at a save point mid-run: the save call, which for async is the
staging copy, plus any wait for the previous save), the final wait (the end of the run waiting for its last
save to be published), and the wall-time overhead per save against the run without saves (for async this
also counts the background writer competing with the following steps for the cores).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.train.async_checkpoint import CheckpointSaver
from cybertron.train.optim import build_optimizer
from cybertron.train.trainer import LanguageModelStep, Trainer


def run(mode: str, args: argparse.Namespace, out: Path) -> dict[str, float]:
    cfg = preset_config("tiny", dim=args.dim, n_layers=args.layers, ffn_dim=args.dim * 8 // 3, n_heads=8,
                        n_kv_heads=4, max_seq_len=args.seq)
    model = build_model(cfg, seed=0)
    optimizer = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    trainer = Trainer(model, optimizer, LanguageModelStep(), lambda step: 1e-3, 1.0)
    gen = torch.Generator().manual_seed(0)
    saver = CheckpointSaver(out / mode, cfg, keep=1, async_save=mode == "async") if mode != "none" else None
    steps, stalls = [], []
    start = time.perf_counter()
    for step in range(args.steps):
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=gen)
        t0 = time.perf_counter()
        trainer.train_step(step, [{"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}])
        steps.append(time.perf_counter() - t0)
        if saver is not None:
            t0 = time.perf_counter()
            saver.poll()
            if (step + 1) % args.every == 0:
                saver.save(step + 1, model, optimizer, {})
                stalls.append(time.perf_counter() - t0)
    final_wait = 0.0
    if saver is not None:
        t0 = time.perf_counter()
        saver.finish()
        saver.close()
        final_wait = time.perf_counter() - t0
    wall = time.perf_counter() - start
    return {"wall": wall, "step": statistics.median(steps), "stall": statistics.median(stalls) if stalls else 0.0,
            "final_wait": final_wait,
            "saves": args.steps // args.every if saver is not None else 0,
            "params": sum(p.numel() for p in model.parameters())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--every", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {"none": [], "sync": [], "async": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for mode in results:
                results[mode].append(run(mode, args, Path(tmp)))
                print(f"{mode}: {results[mode][-1]}", flush=True)  # progress, for runs on a busy machine
        size = sum(p.stat().st_size for p in (Path(tmp) / "sync").rglob("*") if p.is_file())
    params = results["none"][0]["params"]
    print(f"model {params / 1e6:.1f}M parameters, checkpoint {size / 2**20:.0f} MiB (weights + AdamW, with manifest), "
          f"{args.steps} steps of {args.batch}x{args.seq} tokens, a save every {args.every}, "
          f"{args.rounds} round(s), torch {torch.__version__}, {torch.get_num_threads()} threads")
    base_wall = statistics.median(r["wall"] for r in results["none"])
    print(f"{'mode':<6} {'median step (s)':>16} {'stall per save (s)':>19} {'final wait (s)':>15} "
          f"{'wall overhead per save (s)':>27}")
    for mode, runs in results.items():
        saves = runs[0]["saves"]
        med = {key: statistics.median(r[key] for r in runs) for key in ("step", "stall", "final_wait", "wall")}
        overhead = (med["wall"] - base_wall) / saves if saves else 0.0
        print(f"{mode:<6} {med['step']:>16.3f} {med['stall']:>19.3f} {med['final_wait']:>15.3f} {overhead:>27.3f}")

if __name__ == "__main__":
    main()
