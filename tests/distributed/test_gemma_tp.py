"""A Gemma-shaped model (sandwich norms, (1 + w) RMSNorm, embedding scale, soft-capping, qk-norm, sliding
layers with their own RoPE base) under tensor parallelism with sequence parallelism and a vocabulary-sharded
head: the same logits as one process (2 ranks, gloo, fp32)."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cybertron.models.config import ModelConfig
from cybertron.models.llama import build_model
from cybertron.parallel.plans import llama_tp_plan
from cybertron.parallel.tensor_parallel import apply_tensor_parallel

pytestmark = pytest.mark.distributed
CFG = dict(vocab_size=96, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=64, max_seq_len=64,
           mlp_act="gelu_pytorch_tanh", norm_plus_one=True, sandwich_norms=True, embed_scale=True, qk_norm=True,
           attn_scalar=24.0, final_logit_softcap=2.0, attn_softcap=1.0, sliding_window=5, local_rope_theta=100.0,
           layer_types=["sliding_attention", "full_attention", "sliding_attention"], tie_embeddings=True)


def _model() -> torch.nn.Module:
    model = build_model(ModelConfig(**CFG), seed=0).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))) * 0.3)
    return model


def _worker(rank: int, world: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        model = _model()
        model.config.tie_embeddings = False  # a sharded head and embedding are separate parameters under TP
        model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
        apply_tensor_parallel(model, mesh, llama_tp_plan(True, False, (), 3, sandwich_norms=True))
        tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            logits = model(tokens)
        logits = logits.full_tensor() if hasattr(logits, "full_tensor") else logits
        if rank == 0:
            torch.save(logits, out)
    finally:
        dist.destroy_process_group()


def test_gemma_shape_under_tp_with_sequence_parallel_matches_one_process(tmp_path):
    tokens = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = _model()(tokens)
    out = str(tmp_path / "logits.pt")
    mp.spawn(_worker, args=(2, 29671, out), nprocs=2)
    assert (torch.load(out) - expected).abs().max().item() <= 1e-5
