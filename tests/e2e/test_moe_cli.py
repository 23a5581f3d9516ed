"""`cybertron train --model moe` as a user runs it: a few steps that log the expert load and the balancing loss,
resume with the routing bias as saved, and an export that transformers loads as a Mixtral with our logits."""

import subprocess
import sys

import pytest
import torch

from tests.conftest import cli_env, read_metrics


def _cli(args):
    return subprocess.run([sys.executable, "-m", "cybertron", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=300)


@pytest.mark.slow
def test_moe_preset_trains_logs_load_and_exports(tmp_path, fast_run_args):
    transformers = pytest.importorskip("transformers")
    from cybertron.runs import load_run

    args = [*fast_run_args, "--model", "moe", "--steps", "4", "--out", str(tmp_path / "run")]
    done = _cli(args)
    assert done.returncode == 0, done.stderr
    record = [r for r in read_metrics(tmp_path / "run") if "loss" in r][-1]
    assert record["moe_load_max_mean_0"] >= 1.0 and record["moe_aux_loss"] > 0
    exported = _cli(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert exported.returncode == 0, exported.stderr
    ours = load_run(tmp_path / "run").model
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").float().eval()
    assert type(back).__name__ == "MixtralForCausalLM"
    tokens = torch.randint(0, 512, (2, 17), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (back(tokens).logits - ours(tokens)).abs().max() <= 1e-5


@pytest.mark.slow
def test_bias_balanced_run_resumes_and_refuses_a_lossy_export(tmp_path, fast_run_args):
    import shutil

    args = [*fast_run_args, "--model", "moe", "--model.bias_update_rate", "0.01", "--checkpoint.every", "2",
            "--steps", "4", "--out", str(tmp_path / "run")]
    assert _cli(args).returncode == 0
    first = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r}
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-4")  # as if killed after step 2's checkpoint
    resumed = _cli([*args, "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    again = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r}
    assert again[4] == first[4]  # the routing bias came back with the weights
    refused = _cli(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert refused.returncode == 2 and "model.bias_update_rate" in refused.stderr.strip().splitlines()[-1]
