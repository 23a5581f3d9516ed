"""torchtitan 0.2.2 as a benchmark peer on the Llama-3.2-1B shape, which torchtitan ships no flavor of.

    python bench/torchtitan_llama3_1b.py [--workdir DIR] -- --model.flavor 1B --training.local_batch_size 4 \
        --training.seq_len 2048 --training.steps 30 --activation_checkpoint.mode none --compile.enable

Everything after `--` goes to torchtitan's own config parser unchanged. This script only
1. registers the flavors "1B" (Llama-3.2-1B: vocab 128256, dim 2048, 16 layers, 32 heads, 8 kv heads,
   ffn 8192, rope theta 500000 with llama3 scaling factor 32) and "tiny" (cybertron's tiny preset) in
   `torchtitan.models.llama3.llama3_args`;
2. builds the assets torchtitan reads relative to its working directory, since the GPU machine has no
   network: `tests/assets/c4_test/data.json` (JSON lines of real text: this Python's stdlib source, the same
   corpus `cybertron train` defaults to) and `tests/assets/tokenizer/tokenizer.json` (a byte-level BPE trained
   here; the model's vocabulary comes from the flavor, so a smaller tokenizer only uses part of it, but a
   larger one would index past the embedding);
3. fills in the single-process torchrun variables torchtitan reads, and calls `torchtitan.train.main(Trainer)`.

torchtitan differs from cybertron's llama3-1b in one way that matters for memory, not FLOPs: its llama3
model has no tied embeddings, so the output head is a separate 262M-parameter matrix (with its AdamW state)."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import sysconfig
import tempfile
from pathlib import Path

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"


def register_flavors() -> None:
    from torchtitan.models.llama3 import llama3_args
    from torchtitan.models.llama3.model.args import RoPEScalingArgs, TransformerModelArgs

    # torchtitan derives the FFN size: 2/3 * 4 * dim * ffn_dim_multiplier, rounded up to multiple_of.
    # dim 2048: int(int(2 * 8192 / 3) * 1.5) = 8191 -> 8192, Llama-3.2-1B's intermediate_size.
    llama3_args["1B"] = TransformerModelArgs(
        dim=2048, n_layers=16, n_heads=32, n_kv_heads=8, vocab_size=128256, ffn_dim_multiplier=1.5,
        multiple_of=256, norm_eps=1e-5, rope_theta=500000,
        rope_scaling_args=RoPEScalingArgs(scaling_factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                          original_max_position_embeddings=8192))
    # dim 192: int(2 * 768 / 3) = 512 -> 512, the tiny preset's ffn_dim. For CPU smoke runs.
    llama3_args["tiny"] = TransformerModelArgs(dim=192, n_layers=4, n_heads=6, n_kv_heads=2, vocab_size=4096,
                                               multiple_of=256, rope_theta=10000)


def write_assets(workdir: Path, vocab_size: int, max_chars: int) -> None:
    """The c4_test dataset and tokenizer torchtitan expects under tests/assets/, built once per workdir."""
    data_dir, tok_dir = workdir / "tests/assets/c4_test", workdir / "tests/assets/tokenizer"
    if (tok_dir / "tokenizer.json").exists() and (data_dir / "data.json").exists():
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    tok_dir.mkdir(parents=True, exist_ok=True)
    texts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        if text.strip():
            texts.append(text)
            total += len(text)
        if total >= max_chars:
            break
    with (data_dir / "data.json").open("w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    train_tokenizer(texts, vocab_size).save(str(tok_dir / "tokenizer.json"))
    # torchtitan's HuggingFaceTokenizer finds BOS/EOS by these names and appends them to every document.
    (tok_dir / "tokenizer_config.json").write_text(json.dumps({"bos_token": BOS, "eos_token": EOS}))


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BOS, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return tok


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    own, titan_args = argv[:split], argv[split + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="", help="where assets and outputs go; default: a new temp dir")
    p.add_argument("--tokenizer-vocab", type=int, default=4096,
                   help="BPE size; at most the flavor's vocab_size (larger ids index past the embedding)")
    p.add_argument("--data-chars", type=int, default=5_000_000, help="characters of stdlib text in the dataset")
    args = p.parse_args(own)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="torchtitan-bench-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    write_assets(workdir, args.tokenizer_vocab, args.data_chars)
    os.chdir(workdir)
    # One process without torchrun: the variables torchrun would set (torchtitan reads LOCAL_RANK itself).
    for key, value in {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}.items():
        os.environ.setdefault(key, value)
    # The GPU machine has no network: never let `datasets` or the hub try to reach it.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # Before torchtitan is imported: its ConfigManager.parse_args binds sys.argv[1:] as a default argument.
    sys.argv = [sys.argv[0], *titan_args]
    register_flavors()
    from torchtitan.train import Trainer
    from torchtitan.train import main as titan_main

    titan_main(Trainer)


if __name__ == "__main__":
    main()
