"""SFT with LoRA on a mixture-of-experts model (a tiny Mixtral made by transformers): the run trains the
expert adapters with the balancing loss on, logs the expert load, and exports merged to a Mixtral directory
that transformers loads with our logits."""

import json

import pytest
import torch

from cybertron.config import parse_args
from cybertron.finetune.config import SHORTCUTS, FinetuneConfig

transformers = pytest.importorskip("transformers")

from cybertron.commands.finetune import run as run_finetune  # noqa: E402
from cybertron.hf_runs import export_hf  # noqa: E402
from cybertron.runs import load_run  # noqa: E402
from tests.conftest import read_metrics  # noqa: E402
from tests.unit.finetune.tiny_hf import make_hf_dir, write_chats  # noqa: E402


@pytest.mark.slow  # ~4 s: LoRA on experts and the balancing loss have fast unit tests
def test_lora_sft_on_mixtral_trains_experts_and_exports(tmp_path):
    hf = make_hf_dir(tmp_path / "hf", "mixtral", output_router_logits=True, router_aux_loss_coef=0.02)
    chats = write_chats(tmp_path / "chats.jsonl", n=8)
    args = ["--model", str(hf), "--data", str(chats), "--steps", "2", "--out", str(tmp_path / "run"),
            "--seq-len", "96", "--lr", "0.05", "--log.every", "1", "--log.tensorboard", "false",
            "--log.progress", "lines"]
    run = run_finetune(parse_args(args, FinetuneConfig(), SHORTCUTS))
    records = [r for r in read_metrics(run.run_dir) if "loss" in r]
    assert {"moe_load_max_mean_0", "moe_load_max_mean_1", "moe_aux_loss"} <= records[-1].keys()
    loaded = load_run(run.run_dir, head="lm")  # merged
    base = transformers.AutoModelForCausalLM.from_pretrained(hf).float().eval()
    trained = loaded.model.layers["0"].mlp.experts.gate_proj
    assert not torch.allclose(trained, base.model.layers[0].mlp.experts.gate_up_proj[:, :trained.shape[1]])
    out = export_hf(run.run_dir, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["MixtralForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    tokens = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(tokens).logits - loaded.model(tokens)).abs().max().item() <= 1e-5
