"""Adapters in PEFT's format, both ways, against `peft` itself: a cybertron LoRA/DoRA run exported without --merge
loads with `peft.PeftModel.from_pretrained` and gives cybertron's logits; an adapter saved by `peft` loads in
cybertron (generate/serve's loader, and as a fine-tuning base) and gives peft's logits."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from cybertron.commands.export import main as export_main  # noqa: E402
from cybertron.commands.finetune import run as run_finetune  # noqa: E402
from cybertron.config import parse_args  # noqa: E402
from cybertron.errors import UserError  # noqa: E402
from cybertron.finetune.config import SHORTCUTS, FinetuneConfig  # noqa: E402
from cybertron.finetune.lora import adapters_disabled, lora_modules  # noqa: E402
from cybertron.runs import load_base_weights, load_for_inference, load_peft_model, load_run, read_base  # noqa: E402
from tests.parity.test_lora_export import _finetune  # noqa: E402
from tests.unit.finetune.tiny_hf import VOCAB, make_hf_dir, write_chats  # noqa: E402

TOKENS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def _peft_logits(base_dir, adapter_dir):
    base = transformers.AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("family, method", [("llama", "lora"), ("qwen2", "dora")])
def test_exported_adapter_loads_in_peft_with_our_logits(tmp_path, family, method):
    run = _finetune(tmp_path, family, method, steps=3)
    assert any(m.lora_B.abs().max() > 0 for _, m in lora_modules(run.model))  # the adapters did train
    out = tmp_path / "adapter"
    assert export_main(["--run", str(run.run_dir), "--out", str(out)]) == 0  # no --merge: PEFT's format
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 8 and config["lora_alpha"] == 16
    assert config["use_dora"] is (method == "dora")
    assert config["base_model_name_or_path"] == str((tmp_path / "hf").resolve())
    assert (out / "tokenizer.json").is_file() and not (out / "model.safetensors").exists()
    with torch.no_grad():
        ours = load_run(run.run_dir, merge=False).model(TOKENS)
        assert (_peft_logits(tmp_path / "hf", out) - ours).abs().max() <= 1e-5
        # and back: cybertron reads the directory it wrote, adapters kept or merged (generate/serve)
        assert (load_peft_model(out, merge=False)(TOKENS) - ours).abs().max() <= 1e-5
        served, _, _ = load_for_inference(out, as_run=False, device=torch.device("cpu"), dtype="fp32")
        assert (served(TOKENS) - ours).abs().max() <= 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(out)  # the tokenizer and chat template travel with it
    assert "<|im_start|>assistant" in tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                                               add_generation_prompt=True)


def _peft_saved(tmp_path, **lora):
    hf = make_hf_dir(tmp_path / "hf", "qwen2")
    model = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # lora_B starts at zero (and m at ||W||): perturb both so the adapter changes logits
        for name, p in model.named_parameters():
            if "lora_B" in name or "magnitude" in name:
                p.add_(torch.randn(p.shape, generator=generator) * 0.05)
    model.save_pretrained(tmp_path / "adapter")
    return hf, tmp_path / "adapter"


@pytest.mark.parametrize("lora", [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "o_proj", "up_proj"], use_dora=True),
    dict(r=4, lora_alpha=4, target_modules=["k_proj", "gate_proj"], use_rslora=True, layers_to_transform=[1]),
], ids=["lora", "dora", "rslora-subset"])
def test_peft_saved_adapter_loads_with_peft_logits(tmp_path, lora):
    hf, adapter = _peft_saved(tmp_path, **lora)
    expected = _peft_logits(hf, adapter)
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)(TOKENS).logits
        assert (expected - base).abs().max() > 1e-3  # the adapter does change the logits
        assert (load_peft_model(adapter, merge=False)(TOKENS) - expected).abs().max() <= 1e-5
        served, _, _ = load_for_inference(adapter, as_run=False, device=torch.device("cpu"), dtype="fp32")
        assert (served(TOKENS) - expected).abs().max() <= 1e-4
        # as a fine-tuning base (`--model ADAPTER_DIR`): the adapter merged into the base's weights
        cfg, tokenizer = read_base(adapter)
        assert cfg.n_layers == 2 and tokenizer.vocab_size <= VOCAB  # the base's tokenizer: peft saved none
        assert (load_base_weights(adapter, "cpu", torch.float32).eval()(TOKENS) - expected).abs().max() <= 1e-4


def test_finetune_from_a_peft_adapter_trains_over_the_merged_base(tmp_path):
    """`cybertron finetune --model ADAPTER_DIR` (peft saved no tokenizer): the run's base is the adapter merged
    onto its base, and the run directory reloads (run.json names the adapter directory)."""
    hf, adapter = _peft_saved(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], use_dora=True)
    chats = write_chats(tmp_path / "chats.jsonl", n=8)
    cfg = parse_args(["--model.path", str(adapter), "--data.path", str(chats), "--steps", "1",
                      "--train.global_batch_size", "4", "--data.seq_len", "64", "--out", str(tmp_path / "run"),
                      "--log.progress", "lines", "--log.tensorboard", "false", "--eval.every", "0"],
                     FinetuneConfig(), SHORTCUTS)
    run = run_finetune(cfg)
    reloaded = load_run(run.run_dir, merge=False).model
    with torch.no_grad(), adapters_disabled(reloaded):
        assert (reloaded(TOKENS) - _peft_logits(hf, adapter)).abs().max() <= 1e-4


def test_unsupported_peft_options_are_refused_by_name(tmp_path):
    hf, adapter = _peft_saved(tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    config_file = adapter / "adapter_config.json"
    original = json.loads(config_file.read_text())
    for change, named in [({"rank_pattern": {"q_proj": 2}}, "rank_pattern"), ({"bias": "all"}, "bias"),
                          ({"peft_type": "IA3"}, "IA3"), ({"base_model_name_or_path": "org/model"}, "org/model")]:
        config_file.write_text(json.dumps({**original, **change}))
        with pytest.raises(UserError, match=named):
            load_peft_model(adapter)
    config_file.write_text(json.dumps(original))
    other = make_hf_dir(tmp_path / "other", "qwen2", hidden_size=32, intermediate_size=48)
    config_file.write_text(json.dumps({**original, "base_model_name_or_path": str(other)}))
    with pytest.raises(UserError, match="another model"):
        load_peft_model(adapter)


@pytest.mark.slow
def test_qlora_adapter_is_written_as_is(tmp_path):
    """A QLoRA run's adapters go out unchanged (the NF4 base is the loader's choice): the file holds the trained
    tensors, and peft over the full-precision base gives what cybertron gives over that base."""
    pytest.importorskip("torchao")
    run = _finetune(tmp_path, "llama", "qlora", steps=2)
    out = tmp_path / "adapter"
    assert export_main(["--run", str(run.run_dir), "--out", str(out)]) == 0
    trained = dict(lora_modules(run.model))
    written = dict(lora_modules(load_peft_model(out, merge=False)))
    assert trained.keys() == written.keys()
    for name, module in trained.items():
        assert torch.equal(module.lora_A, written[name].lora_A) and torch.equal(module.lora_B, written[name].lora_B)
    assert any(m.lora_B.abs().max() > 0 for m in trained.values())
    with torch.no_grad():
        assert (_peft_logits(tmp_path / "hf", out) - load_peft_model(out)(TOKENS)).abs().max() <= 1e-4
