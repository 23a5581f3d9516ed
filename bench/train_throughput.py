"""Training throughput: cybertron's Trainer vs `transformers` LlamaForCausalLM, same shape, same weights,
same batch, same AdamW, measured in one process run with interleaved rounds (so machine noise hits both).

    python bench/train_throughput.py                      # tiny shape on CPU
    python bench/train_throughput.py --shape llama3-1b --batch 4 --seq 2048   # one GPU

Each side is measured eager and with torch.compile (cybertron: `train.compile`, forward + loss; transformers:
torch.compile of the model, its fastest documented setup); the headline ratio is best against best."""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from cybertron.models.hf import config_to_hf
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.train.metrics import device_peak_flops, flops_per_token
from cybertron.train.optim import build_optimizer
from cybertron.train.trainer import LanguageModelStep, Trainer


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", default="tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=5, help="steps per timed round")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--no-compile", action="store_true",
                   help="measure eager only (skip cybertron with train.compile and transformers + torch.compile)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=0, help="torch threads on CPU (0 = torch's default)")
    return p.parse_args()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_ours(cfg, device, dtype_ctx, compiled: bool):
    # What `cybertron train` builds on one device (train/run.py build_trainer), train.compile included.
    model = build_model(cfg, device=device, seed=0)
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), 1e-8)
    trainer = Trainer(model, opt, LanguageModelStep(compile=compiled), lambda s: 1e-4, grad_clip=1.0,
                      autocast=dtype_ctx)

    def step(inputs, targets):
        trainer.train_step(0, [{"inputs": inputs, "labels": targets}])

    return model, step


def make_peer(cfg, our_model, device, dtype_ctx, compiled: bool):
    import transformers

    hf_cfg = transformers.LlamaConfig(**{k: v for k, v in config_to_hf(cfg).items()
                                         if k not in ("architectures", "model_type")})
    with torch.device(device):
        model = transformers.LlamaForCausalLM(hf_cfg)
    missing = model.load_state_dict({("model." + k if not k.startswith("lm_head") else k): v
                                     for k, v in our_model.state_dict().items()}, strict=False)
    assert not missing.missing_keys, missing.missing_keys
    model.train()
    # Same optimizer as ours: AdamW, same decay groups, fused when ours is.
    opt = build_optimizer(model, 1e-4, 0.1, (0.9, 0.95), 1e-8)
    forward = torch.compile(model) if compiled else model

    def step(inputs, targets):
        with dtype_ctx():
            # labels=targets with shifting disabled is not an HF option; pass the unshifted sequence instead,
            # the same number of predicted tokens (T-1 vs T) within 1/T.
            loss = forward(input_ids=inputs, labels=inputs).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def timed_round(step, inputs, targets, n, device) -> float:
    sync(device)
    start = time.perf_counter()
    for _ in range(n):
        step(inputs, targets)
    sync(device)
    return time.perf_counter() - start


def main() -> None:
    args = parse()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = preset_config(args.shape)
    if device.type == "cuda":
        dtype_ctx = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    else:
        dtype_ctx = contextlib.nullcontext
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq + 1), generator=g).to(device)
    inputs, targets = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()

    our_model, ours = make_ours(cfg, device, dtype_ctx, False)
    runners = {"cybertron": ours, "transformers": make_peer(cfg, our_model, device, dtype_ctx, False)}
    if not args.no_compile:
        runners["cybertron+compile"] = make_ours(cfg, device, dtype_ctx, True)[1]
        runners["transformers+compile"] = make_peer(cfg, our_model, device, dtype_ctx, True)
    for name, step in runners.items():
        start = time.perf_counter()
        timed_round(step, inputs, targets, args.warmup, device)
        print(f"warmup {name}: {time.perf_counter() - start:.1f}s", flush=True)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()

    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, step in runners.items():
            times[name].append(timed_round(step, inputs, targets, args.steps, device))
    report(args, cfg, device, times)


def report(args, cfg, device, times: dict[str, list[float]]) -> None:
    tokens = args.batch * args.seq * args.steps
    peak = device_peak_flops(device)
    fpt = flops_per_token(cfg, args.seq)
    rates = {name: tokens / statistics.median(t) for name, t in times.items()}
    print(f"\nshape={args.shape} batch={args.batch} seq={args.seq} device={device} "
          f"torch={torch.__version__} threads={torch.get_num_threads()}")
    for name, rate in rates.items():
        mfu = f"{100 * rate * fpt / peak:.1f}%" if peak else "n/a"
        print(f"{name:<22} {rate:>12,.0f} tokens/s   MFU {mfu}")
    ours = max((k for k in rates if k.startswith("cybertron")), key=rates.get)
    peer = max((k for k in rates if k.startswith("transformers")), key=rates.get)
    print(f"ratio best cybertron ({ours}) / best transformers ({peer}) = {rates[ours] / rates[peer]:.3f}")
    print(f"ratio eager cybertron / eager transformers = {rates['cybertron'] / rates['transformers']:.3f}")


if __name__ == "__main__":
    main()
