"""After LoRA/DoRA/QLoRA fine-tuning and merge-export, `transformers` loads the exported directory and its
logits match cybertron's unmerged adapter model."""

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cybertron.commands.finetune import run as run_finetune  # noqa: E402
from cybertron.config import parse_args  # noqa: E402
from cybertron.finetune.config import SHORTCUTS, FinetuneConfig  # noqa: E402
from cybertron.finetune.lora import lora_modules  # noqa: E402
from cybertron.hf_runs import export_hf  # noqa: E402
from cybertron.runs import load_run  # noqa: E402
from tests.unit.finetune.tiny_hf import VOCAB, make_hf_dir, write_chats  # noqa: E402


def _finetune(tmp_path, family, method, steps=6):
    hf = make_hf_dir(tmp_path / "hf", family)
    chats = write_chats(tmp_path / "chats.jsonl", n=16)
    cfg = parse_args(["--model.path", str(hf), "--data.path", str(chats), "--finetune.method", method,
                      "--steps", str(steps), "--train.lr", "0.02", "--train.warmup_steps", "0",
                      "--train.global_batch_size", "4", "--data.seq_len", "96", "--out", str(tmp_path / "run"),
                      "--log.progress", "lines", "--log.tensorboard", "false", "--eval.every", "0"],
                     FinetuneConfig(), SHORTCUTS)
    return run_finetune(cfg)


@pytest.mark.parametrize("family, method", [("llama", "lora"), ("qwen2", "dora"), ("mistral", "lora")])
def test_merged_export_matches_unmerged_adapters(tmp_path, family, method):
    run = _finetune(tmp_path, family, method)
    trained = run.model.eval()
    assert any(m.lora_B.abs().max() > 0 for _, m in lora_modules(trained))  # the adapters did train
    export_hf(run.run_dir, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    reloaded = load_run(run.run_dir, merge=False).model
    merged = load_run(run.run_dir).model  # what `cybertron generate --model RUN_DIR` serves
    assert not list(lora_modules(merged))
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained(tokens)
        assert (reloaded(tokens) - expected).abs().max() <= 1e-5  # adapters restored from the checkpoint
        assert (merged(tokens) - expected).abs().max() <= 1e-4
        assert (hf(tokens).logits - expected).abs().max() <= 1e-4
    # the tokenizer travels with the export and renders the chat template
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "export")
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                               add_generation_prompt=True)


def test_qlora_export_matches_the_quantized_model(tmp_path):
    pytest.importorskip("torchao")
    run = _finetune(tmp_path, "llama", "qlora", steps=3)
    export_hf(run.run_dir, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    tokens = torch.randint(0, VOCAB, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (hf(tokens).logits - run.model.eval()(tokens)).abs().max() <= 1e-4
