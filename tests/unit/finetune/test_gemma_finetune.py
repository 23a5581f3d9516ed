"""LoRA SFT on tiny Gemma 2 / Gemma 3 models made by transformers (GeGLU, sandwich norms, soft-capping, windows
the chats outgrow): a few steps train, the merged export loads in transformers with our logits, and the fused
loss, which would skip Gemma 2's final soft-capping, is refused in one line."""

import json

import pytest
import torch

from cybertron.config import parse_args
from cybertron.errors import UserError
from cybertron.finetune.config import SHORTCUTS, FinetuneConfig

transformers = pytest.importorskip("transformers")

from cybertron.commands.finetune import run as run_finetune  # noqa: E402
from cybertron.hf_runs import export_hf  # noqa: E402
from cybertron.runs import load_run  # noqa: E402
from tests.unit.finetune.tiny_hf import make_hf_dir, write_chats  # noqa: E402


def _args(hf, chats, out, *more):
    return ["--model", str(hf), "--data", str(chats), "--steps", "2", "--out", str(out), "--seq-len", "96",
            "--lr", "0.05", "--log.tensorboard", "false", "--log.progress", "lines", *more]


@pytest.mark.slow  # ~5 s each: the conversions have fast parity tests of their own (tests/parity/test_gemma_hf.py)
@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_lora_sft_on_gemma_exports_with_transformers_logits(family, tmp_path):
    hf = make_hf_dir(tmp_path / "hf", family)
    chats = write_chats(tmp_path / "chats.jsonl", n=8)
    run = run_finetune(parse_args(_args(hf, chats, tmp_path / "run"), FinetuneConfig(), SHORTCUTS))
    loaded = load_run(run.run_dir, head="lm")  # merged
    out = export_hf(run.run_dir, tmp_path / "export")
    arch = json.loads((out / "config.json").read_text())["architectures"]
    assert arch == [{"gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}[family]]
    base = transformers.AutoModelForCausalLM.from_pretrained(hf, attn_implementation="eager").float().eval()
    back = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").float().eval()
    tokens = torch.randint(0, 300, (2, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(tokens).logits - loaded.model(tokens)).abs().max().item() <= 1e-5
        assert (back(tokens).logits - base(tokens).logits).abs().max().item() > 1e-4  # the adapters trained
    if family == "gemma2":
        with pytest.raises(UserError, match="final_logit_softcap"):
            run_finetune(parse_args(_args(hf, chats, tmp_path / "fused", "--train.fused_loss", "true"),
                                    FinetuneConfig(), SHORTCUTS))
