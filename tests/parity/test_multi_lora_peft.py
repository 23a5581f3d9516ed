"""Adapters saved by `peft` itself, served side by side (serve/multi_lora.py): each row of one mixed batch
(base, LoRA, DoRA, rsLoRA on a layer subset) gives `peft.PeftModel`'s logits for that row's adapter."""

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from cybertron.models.hf import load_hf_model  # noqa: E402
from cybertron.runs import read_served_adapter  # noqa: E402
from cybertron.serve.multi_lora import attach_adapters  # noqa: E402
from tests.unit.finetune.tiny_hf import VOCAB, make_hf_dir  # noqa: E402

ADAPTERS = {
    "lora": dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    "dora": dict(r=8, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True),
    "rslora": dict(r=2, lora_alpha=4, target_modules=["k_proj", "gate_proj"], use_rslora=True,
                   layers_to_transform=[1]),
}


def _save_with_peft(hf, out, seed, **lora):
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # B starts at zero and m at ||W||: perturb both so the adapter changes the logits
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_pretrained(out)
    return out


def test_a_mixed_batch_of_peft_adapters_gives_peft_logits_per_row(tmp_path):
    hf = make_hf_dir(tmp_path / "hf", "qwen2")  # qwen2: q/k/v biases, which DoRA's rescaling must leave out
    dirs = {name: _save_with_peft(hf, tmp_path / name, seed, **lora)
            for seed, (name, lora) in enumerate(ADAPTERS.items(), start=1)}
    tokens = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = {None: transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(tokens).logits}
        for name, path in dirs.items():
            base = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
            expected[name] = peft.PeftModel.from_pretrained(base, path).eval()(tokens).logits
            assert (expected[name] - expected[None]).abs().max() > 1e-3  # the adapter changes the logits
        served = load_hf_model(hf).eval()
        lora = attach_adapters(served, [read_served_adapter(name, path) for name, path in dirs.items()])
        rows = [None, "lora", "dora", "rslora", "dora", None]
        lora.select([0 if name is None else lora.slot(name) for name in rows])
        mixed = served(tokens.expand(len(rows), -1))
        for row, name in enumerate(rows):
            assert (mixed[row] - expected[name][0]).abs().max() <= 1e-5, name
