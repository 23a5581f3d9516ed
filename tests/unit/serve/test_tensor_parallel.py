"""`--tp N` for serve and generate, before any rank starts: the degree checked against the model's shape from its
config (one error line, exit 2), and whether this process starts the ranks or is one of them."""

import pytest
import torch

from cybertron.cli import main as cli_main
from cybertron.errors import UserError
from cybertron.models.presets import preset_config
from cybertron.parallel.runtime import DistEnv
from cybertron.serve.tensor_parallel import check_tp_degree, check_tp_devices, needs_launch


def test_tp_must_divide_the_heads_and_ffn_but_not_the_vocabulary():
    cfg = preset_config("debug", vocab_size=257)  # 4 heads, 2 kv heads, ffn 128
    check_tp_degree(cfg, 2)
    with pytest.raises(UserError, match="n_kv_heads=2"):
        check_tp_degree(cfg, 4)
    with pytest.raises(UserError, match="ffn_dim=120"):
        check_tp_degree(preset_config("debug", ffn_dim=120, n_heads=16, n_kv_heads=16), 16)


def test_the_command_starts_the_ranks_unless_torchrun_did():
    assert needs_launch(2, DistEnv())
    assert not needs_launch(1, DistEnv())
    assert not needs_launch(2, DistEnv(rank=1, local_rank=1, world_size=2))
    with pytest.raises(UserError, match="runs on 2 ranks .* but --tp is 4"):
        needs_launch(4, DistEnv(world_size=2))


def test_each_rank_needs_a_gpu_of_its_own():
    check_tp_devices(torch.device("cpu"), 4)  # CPU ranks share the machine
    if torch.cuda.device_count() < 8:
        with pytest.raises(UserError, match="starts 8 ranks, one per GPU"):
            check_tp_devices(torch.device("cuda"), 8)


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["generate", "--prompt", "Hi"]])
def test_a_tp_that_does_not_divide_the_kv_heads_is_one_error_line(command, hf_dir, capsys):
    code = cli_main([*command, "--model", str(hf_dir), "--device", "cpu", "--tp", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.splitlines() == ["error: --tp 3 does not divide the model's n_kv_heads=2; tensor parallelism gives "
                                "each rank an equal share of them, so use a --tp that divides 2"]


def test_tp_below_one_is_refused(hf_dir, capsys):
    assert cli_main(["serve", "--model", str(hf_dir), "--tp", "0"]) == 2
    assert "--tp must be >= 1, got 0" in capsys.readouterr().err
