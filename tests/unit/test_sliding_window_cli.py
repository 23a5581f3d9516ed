"""model.sliding_window through `cybertron train`: a bad window is one line (exit 2), and a trained model keeps
its window in the checkpoint and generates with it through the paged cache."""

import json
import random

import torch

from cybertron.cli import main as cli_main
from cybertron.runs import load_run
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams


def test_a_negative_window_is_one_line(tmp_path, capsys):
    code = cli_main(["train", "--model.preset", "debug", "--model.sliding_window", "-3",
                     "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.sliding_window must be positive" in err[0], err
    assert not (tmp_path / "run").exists()


def test_trained_window_is_kept_and_served(tmp_path):
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "eps", "zeta"]
    corpus = tmp_path / "text.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choices(words, k=40))}) + "\n" for _ in range(60)))
    assert cli_main(["train", "--data.path", str(corpus), "--data.cache_dir", str(tmp_path / "cache"),
                     "--data.vocab_size", "300", "--data.seq_len", "64", "--model.preset", "debug",
                     "--model.sliding_window", "8", "--steps", "1", "--train.global_batch_size", "2",
                     "--eval.every", "0", "--log.tensorboard", "false", "--out", str(tmp_path / "run")]) == 0
    model = load_run(tmp_path / "run").model.eval()
    assert model.config.sliding_window == 8
    prompt = list(range(3, 23))
    engine = Engine(model, max_batch_size=1, num_blocks=8, block_size=8)
    out = engine.generate([prompt], SamplingParams(temperature=0.0, max_tokens=6))[0].token_ids
    tokens = list(prompt)
    with torch.no_grad():  # greedy without a cache: the mask path, which the parity tests tie to transformers
        for _ in range(6):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    assert out == tokens[len(prompt):]
