"""One layer's decode attention over a paged KV pool: the ways to read it through the block table.

    python bench/paged_attention.py                       # tiny preset's heads, 2k context, 8 and 32 rows
    python bench/paged_attention.py --rows 32 --context 2048 --block-size 64

Times, in turns (round robin, best and median of --repeats): "gather" (each row's blocks copied into one
dense tensor, then one SDPA call: the engine's earlier path), "paged-fused" and "paged-matmul"
(serve/paged_attention.py, both ways of attending a chunk) and "flex" (torch.compile'd FlexAttention with
a paged BlockMask whose kv indices are the block table itself, as in torch's experimental PagedAttention;
its compile time is printed). Block tables are consecutive runs, as after a batched prefill, and every
variant's output is checked against the gather path first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from cybertron.serve.paged_attention import paged_attention


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", default="8,32", help="comma-separated batch sizes (decode rows)")
    parser.add_argument("--context", type=int, default=2048)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--head-dim", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-flex", action="store_true")
    return parser.parse_args()


def variants(rows: int, args) -> dict:
    bs, n_kv, hd, s = args.block_size, args.kv_heads, args.head_dim, args.context
    width = s // bs
    num_blocks = 1 + rows * width
    gen = torch.Generator().manual_seed(0)
    k_pool = torch.randn(num_blocks, bs, n_kv, hd, generator=gen)
    v_pool = torch.randn(num_blocks, bs, n_kv, hd, generator=gen)
    table = (torch.arange(rows * width) + 1).view(rows, width)
    q = torch.randn(rows, 1, args.heads, hd, generator=gen)
    positions = torch.full((rows, 1), s - 1)

    def gather():
        keys = F.embedding(table, k_pool.view(num_blocks, -1)).view(rows, s, n_kv, hd)
        values = F.embedding(table, v_pool.view(num_blocks, -1)).view(rows, s, n_kv, hd)
        mask = (torch.arange(s) <= positions[:, :, None])[:, None]
        return F.scaled_dot_product_attention(q.transpose(1, 2), keys.transpose(1, 2), values.transpose(1, 2),
                                              attn_mask=mask, enable_gqa=True).transpose(1, 2)

    runs = {"gather": gather,
            "paged-fused": lambda: paged_attention(q, k_pool, v_pool, table, positions, fused=True),
            "paged-matmul": lambda: paged_attention(q, k_pool, v_pool, table, positions, fused=False)}
    if not args.skip_flex:
        runs["flex"] = flex_variant(q, k_pool, v_pool, table, positions)
    return runs


def flex_variant(q, k_pool, v_pool, table, positions):
    """FlexAttention over the whole pool as one sequence of num_blocks * block_size keys: kv block b of row r
    is the physical block table[r, b]; every block but the row's last is full (no mask), the last one is
    masked by the logical position of each key (a physical -> logical block lookup, as torch's helper)."""
    from torch.nn.attention.flex_attention import BlockMask, flex_attention

    rows, width = table.shape
    num_blocks, bs, n_kv, hd = k_pool.shape
    keys = k_pool.view(1, -1, n_kv, hd).transpose(1, 2)
    values = v_pool.view(1, -1, n_kv, hd).transpose(1, 2)
    logical = torch.zeros(rows, num_blocks, dtype=torch.int32)
    logical.scatter_(1, table, torch.arange(width, dtype=torch.int32).expand(rows, width))

    def mask_mod(b, h, q_idx, kv_idx):
        return logical[b, kv_idx // bs] * bs + kv_idx % bs <= positions[b, q_idx]

    partial = torch.zeros(rows, 1, 1, num_blocks, dtype=torch.int32)
    full = torch.zeros(rows, 1, 1, num_blocks, dtype=torch.int32)
    partial[:, 0, 0, 0] = table[:, -1]
    full[:, 0, 0, :width - 1] = table[:, :-1]
    block_mask = BlockMask.from_kv_blocks(torch.ones(rows, 1, 1, dtype=torch.int32), partial,
                                          torch.full((rows, 1, 1), width - 1, dtype=torch.int32), full,
                                          BLOCK_SIZE=(1, bs), mask_mod=mask_mod, seq_lengths=(1, num_blocks * bs))
    compiled = torch.compile(flex_attention, dynamic=False)

    def run():
        return compiled(q.transpose(1, 2), keys, values, block_mask=block_mask, enable_gqa=True).transpose(1, 2)
    start = time.perf_counter()
    run()
    print(f"  flex: first call (compilation) {time.perf_counter() - start:.1f} s")
    return run


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    print(f"context {args.context}, block size {args.block_size}, heads {args.heads}/{args.kv_heads} x "
          f"{args.head_dim}, fp32, {torch.get_num_threads()} threads; ms per layer (best / median of {args.repeats})")
    with torch.inference_mode():
        for rows in (int(r) for r in args.rows.split(",")):
            runs = variants(rows, args)
            reference = runs["gather"]()
            for name, run in runs.items():
                torch.testing.assert_close(run(), reference, atol=1e-5, rtol=1e-5, msg=name)
            times: dict[str, list[float]] = {name: [] for name in runs}
            for _ in range(args.repeats):
                for name, run in runs.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
            print(f"  {rows} rows: " + ", ".join(f"{name} {min(t) * 1e3:.2f} / {statistics.median(t) * 1e3:.2f}"
                                                 for name, t in times.items()))


if __name__ == "__main__":
    main()
