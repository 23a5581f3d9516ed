"""LoRA SFT on a tiny Phi-3 made by transformers (fused qkv_proj / gate_up_proj, partial rotary): the adapters
train on the split projections, the merged export is a fused Phi-3 directory transformers loads with our logits,
and a PEFT export is refused in one line (PEFT's Phi-3 adapters sit on the fused modules)."""

import json

import pytest
import torch

from cybertron.config import parse_args
from cybertron.errors import UserError
from cybertron.finetune.config import SHORTCUTS, FinetuneConfig

transformers = pytest.importorskip("transformers")

from cybertron.commands.finetune import run as run_finetune  # noqa: E402
from cybertron.hf_runs import export_hf, export_peft  # noqa: E402
from cybertron.runs import load_run  # noqa: E402
from tests.unit.finetune.tiny_hf import make_hf_dir, write_chats  # noqa: E402


@pytest.mark.slow  # ~4 s: Phi-3's conversion and LoRA each have fast tests of their own
def test_lora_sft_on_phi3_exports_fused_and_refuses_peft(tmp_path):
    hf = make_hf_dir(tmp_path / "hf", "phi3")
    chats = write_chats(tmp_path / "chats.jsonl", n=8)
    args = ["--model", str(hf), "--data", str(chats), "--steps", "2", "--out", str(tmp_path / "run"),
            "--seq-len", "96", "--lr", "0.05", "--log.tensorboard", "false", "--log.progress", "lines"]
    run = run_finetune(parse_args(args, FinetuneConfig(), SHORTCUTS))
    loaded = load_run(run.run_dir, head="lm")  # merged
    base = transformers.AutoModelForCausalLM.from_pretrained(hf).float().eval()
    q_rows = loaded.model.layers["0"].self_attn.q_proj.weight.shape[0]
    assert not torch.allclose(loaded.model.layers["0"].self_attn.q_proj.weight,
                              base.model.layers[0].self_attn.qkv_proj.weight[:q_rows])
    out = export_hf(run.run_dir, tmp_path / "export")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["Phi3ForCausalLM"]
    back = transformers.AutoModelForCausalLM.from_pretrained(out).float().eval()
    tokens = torch.randint(0, 300, (2, 13), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(tokens).logits - loaded.model(tokens)).abs().max().item() <= 1e-5
    with pytest.raises(UserError, match="qkv_proj"):
        export_peft(run.run_dir, tmp_path / "peft")
