"""runs.py: the run directory's metadata (run.json), runs written before it (finetune.json or no metadata)
still loading with the same weights, and `load_run` for a pretraining and a fine-tuning run."""

import json

import pytest
import torch

from cybertron.align.config import AlignConfig
from cybertron.config import parse_args
from cybertron.finetune.config import SHORTCUTS, FinetuneConfig
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.runs import LEGACY_FILE, RUN_FILE, RunMeta, finetune_meta, load_run, read_meta
from cybertron.train.checkpoint import save_checkpoint
from cybertron.train.optim import build_optimizer

CFG = preset_config("debug", tie_embeddings=True)


def test_a_run_without_metadata_loads_as_a_whole_model(tmp_path):
    from tokenizers import Tokenizer, models

    model = build_model(CFG, seed=0)
    opt = build_optimizer(model, 1e-3, 0.1, (0.9, 0.95), 1e-8)
    model(torch.randint(0, 256, (2, 8))).float().logsumexp(-1).mean().backward()
    opt.step()
    save_checkpoint(tmp_path, 1, model, opt, {}, CFG)
    tok = Tokenizer(models.BPE())
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    run = load_run(tmp_path)
    tokens = torch.randint(0, 256, (1, 12))
    with torch.no_grad():
        assert torch.equal(run.model(tokens), model(tokens))
    assert run.tokenizer.eos_id == 0
    assert run.meta == RunMeta("pretrain") and run.checkpoint.name == "step-1" and run.run_dir == tmp_path


def test_legacy_finetune_json_reads_as_the_run_json_align_writes():
    cfg = parse_args(["--model.path=/m", "--align.method=reward", "--finetune.method=dora", "--finetune.rank=4"],
                     AlignConfig())
    written = finetune_meta(cfg)
    legacy = {"method": "dora", "base_model": "/m", "lora": written.adapters.lora.to_dict(), "nf4_block_size": 64,
              "align_method": "reward", "head": "reward"}  # what align wrote before run.json
    assert RunMeta.from_legacy(legacy) == written
    assert RunMeta.from_dict(json.loads(json.dumps(written.to_dict()))) == written
    assert (written.kind, written.head, written.method, written.adapters.lora.rank) == ("reward", "reward", "dora", 4)


def test_finetune_run_writes_run_json_and_a_legacy_run_loads_the_same(tmp_path):
    pytest.importorskip("transformers")
    from cybertron.commands.finetune import run as run_finetune
    from tests.unit.finetune.tiny_hf import VOCAB, make_hf_dir, write_chats

    hf = make_hf_dir(tmp_path / "hf", "llama")
    chats = write_chats(tmp_path / "chats.jsonl", n=8)
    args = ["--model", str(hf), "--data", str(chats), "--steps", "1", "--out", str(tmp_path / "run"),
            "--seq-len", "64", "--lr", "0.05", "--log.tensorboard", "false", "--log.progress", "lines"]
    trained = run_finetune(parse_args(args, FinetuneConfig(), SHORTCUTS))
    run_dir = trained.run_dir
    meta = json.loads((run_dir / RUN_FILE).read_text())
    assert meta["kind"] == "finetune" and meta["base_model"] == str(hf.resolve()) and meta["head"] == "lm"
    assert meta["adapters"]["method"] == "lora" and meta["adapters"]["lora"]["rank"] == 8
    assert not (run_dir / LEGACY_FILE).exists()

    tokens = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = trained.model.eval()(tokens)
        assert (load_run(run_dir, merge=False).model(tokens) - expected).abs().max() <= 1e-5
        # A run written before run.json: finetune.json in its old shape, the same weights load.
        (run_dir / LEGACY_FILE).write_text(json.dumps({"method": "lora", "base_model": str(hf.resolve()),
                                                       "lora": meta["adapters"]["lora"], "nf4_block_size": 64}))
        (run_dir / RUN_FILE).unlink()
        legacy = load_run(run_dir)
        assert (legacy.model(tokens) - expected).abs().max() <= 1e-4
    assert legacy.meta == read_meta(run_dir) == RunMeta.from_dict(meta)
