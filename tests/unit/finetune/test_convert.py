"""`cybertron convert` both ways and `cybertron export`: logits kept, generation that stops at end-of-text in
`transformers`, ordinary file modes, and the clear one-line errors (exit 2) for bad model directories."""

import json
import os
import shutil

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cybertron.cli import main as cli_main  # noqa: E402
from cybertron.runs import load_run  # noqa: E402
from tests.scripted_model import write_scripted_run  # noqa: E402
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
    run = load_run(tmp_path / "run")  # `cybertron generate --model` loads it as is
    model, tokenizer = run.model, run.tokenizer
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    with torch.no_grad():
        expected = reference(_tokens()).logits
        assert (model(_tokens()) - expected).abs().max() <= 1e-5
    assert tokenizer.chat_template is not None

    assert cli_main(["convert", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
    with torch.no_grad():
        assert (back(_tokens()).logits - expected).abs().max() <= 1e-5
    assert (tmp_path / "back" / "tokenizer_config.json").is_file()


@pytest.fixture(scope="module")
def scripted_run(tmp_path_factory):
    """A pretraining run (no HF config behind it: its tokenizer alone knows eos) whose greedy continuation of
    "x" is "ab" and then <|endoftext|>."""
    from cybertron.data.tokenizer import train_bpe_tokenizer

    tokenizer = train_bpe_tokenizer(["abc xyz\n" * 4], vocab_size=260)
    x, a, b = (tokenizer.encode(ch)[0] for ch in "xab")
    run = write_scripted_run(tmp_path_factory.mktemp("run"), tokenizer, {x: a, a: b, b: tokenizer.eos_id})
    return run, tokenizer, [x, a, b, tokenizer.eos_id]


@pytest.mark.parametrize("command", ["convert", "export"])
def test_exported_model_generates_until_end_of_text_in_transformers(scripted_run, tmp_path, command):
    run, tokenizer, expected = scripted_run
    assert cli_main([command, "--run", str(run), "--out", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["eos_token_id"], config["bos_token_id"], config["pad_token_id"]) == (tokenizer.eos_id, None, None)
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == {"eos_token_id": tokenizer.eos_id}
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    out = model.generate(torch.tensor([expected[:1]]), max_new_tokens=12, do_sample=False,
                         pad_token_id=tokenizer.eos_id)
    assert out[0].tolist() == expected  # stopped at <|endoftext|>, 9 tokens short of max_new_tokens


def test_export_stops_at_the_chat_end_token_and_the_bases_eos(tmp_path):
    """A base whose config ends text with <|endoftext|> (id 0) and whose tokenizer ends turns with <|im_end|>
    (id 2): generation stops at either, as HF instruct models do; config.json keeps the base's own ids and
    generation_config.json its sampling settings."""
    base = make_hf_dir(tmp_path / "base", "llama", bos_token_id=3, eos_token_id=0)
    settings = json.loads((base / "generation_config.json").read_text())
    (base / "generation_config.json").write_text(json.dumps({**settings, "do_sample": True, "temperature": 0.6}))
    assert cli_main(["convert", "--from-hf", str(base), "--out", str(tmp_path / "run")]) == 0
    assert cli_main(["convert", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
    config = json.loads((tmp_path / "back" / "config.json").read_text())
    assert [config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")] == [3, 0, 0]
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "back")
    assert generation.eos_token_id == [2, 0] and generation.pad_token_id == 0 and generation.temperature == 0.6


@pytest.mark.parametrize("umask", [0o022, 0o002])
def test_exported_files_have_the_mode_an_ordinary_open_gives(scripted_run, tmp_path, umask):
    old = os.umask(umask)
    try:
        assert cli_main(["export", "--run", str(scripted_run[0]), "--out", str(tmp_path / "hf")]) == 0
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "hf").iterdir()}
    assert "model.safetensors" in modes and set(modes.values()) == {0o666 & ~umask}, modes


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
    assert cli_main(["export", "--run", str(tmp_path / "nope"), "--out", str(tmp_path / "x")]) == 2
    assert cli_main(["convert", "--from-hf", str(hf_dir)]) == 2  # --out missing


# A child that runs one CLI command with `module.attr` wrapped: the real function runs, then the child marks
# a file and sleeps, so the test kills it at a known point, with the target's files half written.
_PAUSED_CHILD = """
import importlib, pathlib, sys, time
module_name, attr, marker = sys.argv[1:4]
module = importlib.import_module(module_name)
real = getattr(module, attr)
def written_then_paused(*args, **kwargs):
    real(*args, **kwargs)
    pathlib.Path(marker).touch()
    time.sleep(600)
setattr(module, attr, written_then_paused)
from cybertron.cli import main
sys.exit(main(sys.argv[4:]))
"""


def _kill_when_paused(tmp_path, hook: str, argv: list[str]) -> None:
    import signal
    import subprocess
    import sys
    import time

    marker = tmp_path / "paused"
    child = subprocess.Popen([sys.executable, "-c", _PAUSED_CHILD, *hook.split(":"), str(marker), *argv])
    try:
        deadline = time.monotonic() + 120
        while not marker.exists():
            assert child.poll() is None, f"the child exited ({child.returncode}) before the hook ran"
            assert time.monotonic() < deadline, "the hook never ran"
            time.sleep(0.05)
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()


@pytest.mark.parametrize("command, hook, written", [
    ("export", "cybertron.models.hf:save_file", "model.safetensors"),
    pytest.param("convert", "cybertron.hf_runs:copy_tokenizer_files", "tokenizer.json", marks=pytest.mark.slow),
])
def test_a_killed_export_leaves_no_target_and_a_rerun_completes(scripted_run, hf_dir, tmp_path, command, hook,
                                                                written):
    """SIGKILL while the weights (export) or the run files (convert --from-hf) are being written: --out does
    not exist afterwards (the files written so far sit in a hidden temp directory beside it), and the same
    command then writes it whole."""
    out = tmp_path / "out"
    argv = ["export", "--run", str(scripted_run[0]), "--out", str(out)] if command == "export" else \
        ["convert", "--from-hf", str(hf_dir), "--out", str(out)]
    _kill_when_paused(tmp_path, hook, argv)
    assert not out.exists()
    partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(partial) == 1 and (partial[0] / written).is_file()  # the kill did land mid-write
    assert cli_main(argv) == 0
    if command == "export":
        transformers.AutoModelForCausalLM.from_pretrained(out)
    else:
        load_run(out)


def test_export_refuses_a_non_empty_target_and_leaves_it_as_it_was(scripted_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert cli_main(["export", "--run", str(scripted_run[0]), "--out", str(out)]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    capsys.readouterr()
    for command in ("export", "convert"):
        assert cli_main([command, "--run", str(scripted_run[0]), "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err == [f"error: --out {out} exists and is not empty; choose a new directory"]
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp directory left either
