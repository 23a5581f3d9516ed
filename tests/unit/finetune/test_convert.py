"""`cybertron convert` both ways, and the clear one-line errors (exit 2) for bad model directories."""

import json
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cybertron.cli import main as cli_main  # noqa: E402
from cybertron.train.checkpoint import load_inference_model  # noqa: E402
from tests.unit.finetune.tiny_hf import VOCAB, make_hf_dir, write_chats  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    hf = make_hf_dir(tmp_path_factory.mktemp("model") / "hf", "qwen2", max_shard_size="150KB")
    assert (hf / "model.safetensors.index.json").is_file()  # sharded, as large published models are
    return hf


def _tokens():
    return torch.randint(0, VOCAB, (2, 30), generator=torch.Generator().manual_seed(0))


def test_convert_round_trip_keeps_logits(hf_dir, tmp_path):
    assert cli_main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    model, tokenizer = load_inference_model(tmp_path / "run")  # `cybertron generate --out` loads it as is
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    with torch.no_grad():
        expected = reference(_tokens()).logits
        assert (model(_tokens()) - expected).abs().max() <= 1e-5
    assert tokenizer.chat_template is not None

    assert cli_main(["convert", "--out", str(tmp_path / "run"), "--to", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    with torch.no_grad():
        assert (back(_tokens()).logits - expected).abs().max() <= 1e-5
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()


def _broken(hf_dir, tmp_path, case):
    bad = tmp_path / case
    shutil.copytree(hf_dir, bad)
    if case == "no-config":
        (bad / "config.json").unlink()
    elif case == "no-weights":
        for f in bad.glob("model*.safetensors*"):
            f.unlink()
    elif case == "unsupported-arch":
        cfg = json.loads((bad / "config.json").read_text())
        cfg["architectures"] = ["GPT2LMHeadModel"]
        (bad / "config.json").write_text(json.dumps(cfg))
    elif case == "broken-chat-template":
        cfg = json.loads((bad / "tokenizer_config.json").read_text())
        cfg["chat_template"] = "{% for message in messages %}"  # never closed
        (bad / "tokenizer_config.json").write_text(json.dumps(cfg))
    return bad


@pytest.mark.parametrize("case, fragment", [("no-config", "config.json is missing"),
                                            ("no-weights", "has no weights"),
                                            ("unsupported-arch", "unsupported architecture 'GPT2LMHeadModel'"),
                                            ("broken-chat-template", "the model's chat template is not valid "
                                                                     "Jinja")])
def test_bad_model_directory_is_one_line_and_exit_2(hf_dir, tmp_path, capsys, case, fragment):
    bad = _broken(hf_dir, tmp_path, case)
    chats = write_chats(tmp_path / "chats.jsonl", n=4)
    code = cli_main(["finetune", "--model", str(bad), "--data", str(chats), "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "run").exists()  # nothing written


def test_bad_flags_are_reported(hf_dir, tmp_path, capsys):
    chats = write_chats(tmp_path / "chats.jsonl", n=4)
    args = ["finetune", "--model", str(hf_dir), "--data", str(chats), "--out", str(tmp_path / "run")]
    assert cli_main([*args, "--method", "prefix"]) == 2
    assert "finetune.method must be one of lora, dora, qlora, full" in capsys.readouterr().err
    assert cli_main([*args, "--finetune.targets", "qkv"]) == 2
    assert "'qkv' matches no linear layer" in capsys.readouterr().err
    assert cli_main(["export", "--out", str(tmp_path / "nope"), "--to", str(tmp_path / "x")]) == 2
    assert cli_main(["convert", "--from-hf", str(hf_dir)]) == 2  # --out missing
