"""Mixture-of-experts models through the CLI: `convert` both ways keeps transformers' logits for a Mixtral,
and bad MoE settings end in one line naming the key (exit 2)."""

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from cybertron.cli import main as cli_main  # noqa: E402
from cybertron.runs import load_run  # noqa: E402
from tests.unit.finetune.tiny_hf import VOCAB, make_hf_dir  # noqa: E402


@pytest.mark.slow  # the same conversion's logits are checked by tests/parity/test_moe_hf.py by default
def test_convert_mixtral_round_trip_keeps_logits(tmp_path):
    hf_dir = make_hf_dir(tmp_path / "hf", "mixtral")
    assert cli_main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 0
    model = load_run(tmp_path / "run").model
    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).float().eval()
    tokens = torch.randint(0, VOCAB, (2, 19), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference(tokens).logits
        assert (model(tokens) - expected).abs().max() <= 1e-5
        assert cli_main(["convert", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "back")]) == 0
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").float().eval()
        assert (back(tokens).logits - expected).abs().max() <= 1e-5
    assert json.loads((tmp_path / "back" / "config.json").read_text())["num_local_experts"] == 4


@pytest.mark.parametrize("flags, fragment", [
    (["--model.top_k", "9"], "model.top_k=9 must be between 1 and model.n_experts=8"),
    (["--model.aux_loss_coef", "-1"], "model.aux_loss_coef"),
])
def test_bad_moe_settings_are_one_line(tmp_path, capsys, flags, fragment):
    code = cli_main(["train", "--model", "moe", "--out", str(tmp_path / "run"), *flags])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ") and fragment in err[0], err
    assert not (tmp_path / "run").exists()


def test_unsupported_routing_in_a_checkpoint_is_one_line(tmp_path, capsys):
    hf_dir = make_hf_dir(tmp_path / "hf", "mixtral", router_jitter_noise=0.1)
    capsys.readouterr()  # transformers' progress bars while writing it
    assert cli_main(["convert", "--from-hf", str(hf_dir), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "router_jitter_noise" in err[0], err
