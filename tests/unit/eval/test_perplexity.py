"""`cybertron eval --perplexity`: exp(mean NLL) over the documented windows, checked against the same weights run
by transformers (its own loss over -100-masked labels) on the same token streams."""

import json
import math

import pytest
import torch

from cybertron.commands.eval import main as eval_main
from cybertron.eval.perplexity import perplexity_of_files, windows
from cybertron.runs import load_for_inference


def reference_perplexity(hf_dir, files, seq_len, stride):
    """transformers' model and tokenizer: each file is bos/eos + (document + eos)...; chunks of `stride` targets
    with at most seq_len inputs before them, the loss of each chunk from HF's shifted, -100-masked labels."""
    import transformers

    from cybertron.data.sources import iter_documents

    tok = transformers.PreTrainedTokenizerFast.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    nll, count, per_file = 0.0, 0, {}
    for file in files:
        ids = [start]
        for doc in iter_documents(str(file)):
            ids += tok(doc, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        file_nll = 0.0
        for first in range(1, len(ids), stride):
            end = min(first + stride, len(ids))
            window = torch.tensor([ids[max(0, end - seq_len - 1):end]])
            labels = window.clone()
            labels[0, :window.shape[1] - (end - first)] = -100
            with torch.no_grad():
                file_nll += model(window, labels=labels).loss.item() * (end - first)
        per_file[str(file)] = math.exp(file_nll / (len(ids) - 1))
        nll, count = nll + file_nll, count + len(ids) - 1
    return per_file, math.exp(nll / count)


def test_windows_score_every_token_once_within_seq_len():
    ids = list(range(50))
    for seq_len, stride in [(8, 8), (8, 3), (8, 1), (64, 64)]:
        pairs = windows(ids, seq_len, stride)
        targets = [t for _, cont in pairs for t in cont]
        assert targets == ids[1:]
        assert all(1 <= len(ctx) and len(ctx) + len(cont) - 1 <= seq_len for ctx, cont in pairs)
        # sliding: a window's inputs are as many as fit (seq_len) once the stream is long enough
        assert all(len(ctx) + len(cont) - 1 == seq_len for ctx, cont in pairs if cont[-1] > seq_len)


def test_cli_perplexity_matches_transformers(hf_dir, text_files, tmp_path, capsys):
    out = tmp_path / "results"
    assert eval_main([str(hf_dir), "--perplexity", *map(str, text_files), "--seq-len", "16", "--batch-size", "3",
                      "--out", str(out), "--name", "ppl"]) == 0
    record = json.loads((out / "ppl.json").read_text())
    per_file, total = reference_perplexity(hf_dir, text_files, seq_len=16, stride=16)
    got = record["perplexity"]
    assert (got["seq_len"], got["stride"]) == (16, 16)
    for file, expected in per_file.items():
        assert got["files"][file]["perplexity"] == pytest.approx(expected, rel=1e-5)
    assert got["total"]["perplexity"] == pytest.approx(total, rel=1e-5)
    assert record["config"]["eval"]["batch_size"] == 3 and record["model"] == str(hf_dir.resolve())
    assert f"perplexity {text_files[0]}:" in capsys.readouterr().out


def test_sliding_and_whole_windows_match_transformers(hf_dir, text_files):
    model, tokenizer, _ = load_for_inference(hf_dir, False, torch.device("cpu"))
    sliding = perplexity_of_files(model, tokenizer, text_files, seq_len=12, stride=5, batch_size=4)
    _, expected = reference_perplexity(hf_dir, text_files, seq_len=12, stride=5)
    assert sliding["total"]["perplexity"] == pytest.approx(expected, rel=1e-5)
    # one window holding each whole file: the plain exp(loss) of the sequence
    whole = perplexity_of_files(model, tokenizer, text_files, seq_len=256, stride=256, batch_size=1)
    _, expected_whole = reference_perplexity(hf_dir, text_files, seq_len=256, stride=256)
    assert whole["total"]["perplexity"] == pytest.approx(expected_whole, rel=1e-5)
    assert whole["total"]["tokens"] == sliding["total"]["tokens"]


def test_results_of_a_run_go_into_its_eval_folder(hf_dir, text_files, tmp_path, capsys):
    """A run directory holds its own results (RUN/eval/<UTC time>.json); the converted weights score as the
    Hugging Face directory they came from."""
    from cybertron.hf_runs import convert_from_hf

    run = tmp_path / "run"
    convert_from_hf(hf_dir, run)
    assert eval_main(["--run", str(run), "--perplexity", str(text_files[1]), "--seq-len", "32"]) == 0
    (written,) = (run / "eval").glob("*.json")
    got = json.loads(written.read_text())["perplexity"]["total"]["perplexity"]
    _, expected = reference_perplexity(hf_dir, text_files[1:], seq_len=32, stride=32)
    assert got == pytest.approx(expected, rel=1e-5)
    assert f"results: {written}" in capsys.readouterr().out
