"""`cybertron train` as a user runs it: a subprocess, killed and resumed; bad input gets one clear line."""

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import cli_env, read_metrics


def _cli(args, **kwargs):
    return subprocess.run([sys.executable, "-m", "cybertron", *args], capture_output=True, text=True,
                          env=cli_env(), timeout=300, **kwargs)


def _losses(run_dir):
    # the last record per step wins (a resumed run re-logs nothing it kept)
    return {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}


def test_kill_and_resume_is_bitwise_identical(tmp_path, fast_run_args):
    steps = 24
    args = [*fast_run_args, "--steps", str(steps), "--checkpoint.every", "4", "--eval.every", "0"]
    full = _cli([*args, "--out", str(tmp_path / "full")])
    assert full.returncode == 0, full.stderr

    run_dir = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "cybertron", *args, "--out", str(run_dir)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=cli_env())
    deadline = time.time() + 120
    while not (run_dir / "checkpoints" / "step-8").exists():  # killed after two checkpoints, mid-run
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(_losses(run_dir))
    assert killed_at < steps

    resumed = _cli([*args, "--out", str(run_dir), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout
    expected, got = _losses(tmp_path / "full"), _losses(run_dir)
    assert sorted(got) == sorted(expected) and len(got) == steps
    assert got == expected  # bitwise: float equality of every step's loss
    val = [r["val_loss"] for r in read_metrics(run_dir) if "val_loss" in r and r["step"] == steps]
    full_val = [r["val_loss"] for r in read_metrics(tmp_path / "full") if "val_loss" in r and r["step"] == steps]
    assert val == full_val


def test_run_directory_contract(tmp_path, fast_run_args):
    run_dir = tmp_path / "run"
    result = _cli([*fast_run_args, "--steps", "3", "--out", str(run_dir)])
    assert result.returncode == 0, result.stderr
    assert (run_dir / "config.toml").is_file() and (run_dir / "tokenizer.json").is_file()
    assert (run_dir / "checkpoints" / "step-3" / "trainer_state.json").is_file()
    records = read_metrics(run_dir)
    step_records = [r for r in records if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "mem_gib"):
        assert all(key in r for r in step_records), key
    assert all(r["mfu"] is None for r in step_records)  # no known peak for a CPU
    assert any("val_loss" in r for r in records)
    assert "validation loss" in result.stdout and str(run_dir / "checkpoints" / "step-3") in result.stdout
    # the saved config reproduces the run: it parses back and names the same data
    again = _cli(["--config", str(run_dir / "config.toml"), "--steps", "1", "--out", str(tmp_path / "again")])
    assert again.returncode == 0, again.stderr


def test_help_lists_every_key_with_default():
    from cybertron.config import TrainConfig, all_keys

    result = _cli(["train", "--help"])
    assert result.returncode == 0
    for key in all_keys(TrainConfig()):
        assert f"--{key}" in result.stdout, key


@pytest.fixture
def bad_inputs(tmp_path, small_corpus):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    bad_parquet = tmp_path / "broken.parquet"
    bad_parquet.write_bytes(b"PAR1 this is not parquet")
    folder = tmp_path / "folder"  # a file that cannot be read: as root a mode-000 file reads fine, so a link
    folder.mkdir()                # to a file that is gone stands in for it (unit tests cover mode 000)
    (folder / "a.txt").write_text("some text\n")
    (folder / "b.txt").symlink_to(tmp_path / "gone.txt")
    return {
        "missing data path": (["--data.path", str(tmp_path / "nope.txt")], "does not exist"),
        "empty data": (["--data.path", str(empty)], "no text"),
        "unreadable parquet": (["--data.path", str(bad_parquet)], "broken.parquet"),
        "unreadable file in the folder": (["--data.path", str(folder)], f"{folder / 'b.txt'} cannot be read"),
        "seq_len above model max": (["--data.seq_len", "100000"], "maximum sequence length"),
        "negative learning rate": (["--train.lr", "-1"], "train.lr"),
        "unknown key": (["--train.learning_rate", "1"], "did you mean train.lr"),
        "bad value type": (["--train.steps", "many"], "train.steps expects int"),
    }


# A process per case costs seconds of imports, so the user's path (a subprocess: nothing but one line on stderr,
# exit 2) runs for two cases that fail in different layers (the data reader, pyarrow's parquet), and the others
# call the same entry point in-process. An unknown key is refused by the config parser before any work, and
# tests/unit/test_cli_flags.py checks its did-you-mean message in-process: its CLI run here is a slow duplicate.
@pytest.mark.parametrize("case", ["missing data path", "unreadable parquet",
                                  pytest.param("unknown key", marks=pytest.mark.slow)])
def test_bad_input_is_one_clear_line_and_exit_2(case, bad_inputs, fast_run_args, tmp_path):
    extra, fragment = bad_inputs[case]
    run_dir = tmp_path / "run"
    result = _cli([*fast_run_args, "--steps", "2", "--out", str(run_dir), *extra])
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], result.stderr
    assert not run_dir.exists()  # nothing written


@pytest.mark.parametrize("case", ["empty data", "unreadable file in the folder", "seq_len above model max",
                                  "negative learning rate", "bad value type"])
def test_bad_input_in_process_is_one_clear_line_and_exit_2(case, bad_inputs, fast_run_args, tmp_path, capsys):
    from cybertron.cli import main as cli_main

    extra, fragment = bad_inputs[case]
    run_dir = tmp_path / "run"
    assert cli_main(["train", *fast_run_args, "--steps", "2", "--out", str(run_dir), *extra]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0], err
    assert not run_dir.exists()  # nothing written


@pytest.mark.slow  # tests/unit/train/test_checkpoint_verify.py covers damaged checkpoints by default
def test_corrupted_checkpoint_fails_resume_without_touching_the_run(tmp_path, fast_run_args):
    run_dir = tmp_path / "run"
    assert _cli([*fast_run_args, "--steps", "2", "--out", str(run_dir)]).returncode == 0
    shard = next((run_dir / "checkpoints" / "step-2").glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[: len(shard.read_bytes()) // 3])
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    result = _cli([*fast_run_args, "--steps", "4", "--out", str(run_dir), "--resume"])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "step-2" in result.stderr and "corrupted" in result.stderr
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    assert after == before


def test_refuses_to_overwrite_a_run_without_resume(tmp_path, fast_run_args, capsys):
    from cybertron.cli import main as cli_main

    run_dir = tmp_path / "run"
    assert _cli([*fast_run_args, "--steps", "1", "--out", str(run_dir)]).returncode == 0
    assert cli_main(["train", *fast_run_args, "--steps", "1", "--out", str(run_dir)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_resume_of_a_mistyped_out_is_refused(tmp_path, fast_run_args, capsys):
    from cybertron.cli import main as cli_main

    run_dir = tmp_path / "rnu"
    assert cli_main(["train", *fast_run_args, "--steps", "1", "--out", str(run_dir), "--resume"]) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines == [f"error: no checkpoint in {run_dir} to resume (the directory does not exist); "
                     "drop --resume to start a new run"], err
    assert not run_dir.exists()  # nothing written


@pytest.mark.parametrize("command", ["train", "finetune", "align"])
def test_resume_of_a_run_without_checkpoints_is_refused(command, tmp_path, capsys):
    from cybertron.cli import main as cli_main

    run_dir = tmp_path / "run"
    (run_dir / "checkpoints" / ".tmp-step-4").mkdir(parents=True)  # a first save killed before it completed
    (tmp_path / "data.jsonl").write_text("")
    inputs = [] if command == "train" else ["--model", str(tmp_path), "--data", str(tmp_path / "data.jsonl")]
    before = sorted(run_dir.rglob("*"))
    assert cli_main([command, *inputs, "--out", str(run_dir), "--resume"]) == 2
    assert capsys.readouterr().err == (f"error: no checkpoint in {run_dir} to resume; "
                                       "drop --resume to start a new run\n")
    assert sorted(run_dir.rglob("*")) == before


def test_a_reader_closing_stdout_early_ends_the_run_quietly(tmp_path, fast_run_args):
    """`cybertron train | head -n 1`: no BrokenPipe traceback, exit 1 as CPython does on EPIPE."""
    proc = subprocess.Popen([sys.executable, "-m", "cybertron", *fast_run_args, "--steps", "200", "--out",
                             str(tmp_path / "run")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=cli_env())
    first = proc.stdout.readline()
    proc.stdout.close()  # what `head -n 1` does after its line; the run's next write meets a closed pipe
    stderr = proc.stderr.read()
    assert proc.wait(timeout=120) == 1
    assert first.startswith("model ") and stderr == ""


@pytest.mark.slow  # the fused loss is compared step by step in tests/unit and tests/distributed by default
def test_fused_loss_trains_like_the_plain_head(tmp_path, fast_run_args):
    from tests.conftest import read_metrics

    losses = {}
    for fused in ("false", "true"):
        out = tmp_path / fused
        result = _cli([*fast_run_args, "--steps", "4", "--eval.every", "0", "--train.fused_loss", fused,
                       "--out", str(out)])
        assert result.returncode == 0, result.stderr
        losses[fused] = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)


def test_resume_with_nproc_is_refused_once_before_any_rank_starts(tmp_path, capsys):
    """`--nproc 2 --resume` on a directory without checkpoints: one line from the launcher, not one per rank."""
    from cybertron.cli import main as cli_main

    run_dir = tmp_path / "typo"
    assert cli_main(["train", "--nproc", "2", "--parallel.data_parallel", "ddp", "--out", str(run_dir),
                     "--resume"]) == 2
    assert capsys.readouterr().err == (f"error: no checkpoint in {run_dir} to resume (the directory does not "
                                       "exist); drop --resume to start a new run\n")
    assert not run_dir.exists()


def test_a_diverging_run_stops_with_one_line_and_keeps_a_checkpoint_generate_can_use(tmp_path, fast_run_args,
                                                                                     capsys):
    from cybertron.cli import main as cli_main
    from cybertron.train.checkpoint import complete_checkpoints

    # A learning rate of 1e3 overflows the gradients within a few steps (issue 13: it used to run to the end
    # with NaN losses, exit 0, and save NaN checkpoints that `generate` crashed on).
    run_dir = tmp_path / "run"
    args = [*fast_run_args, "--train.warmup_steps", "10", "--train.lr", "1e3", "--steps", "12",
            "--checkpoint.every", "1", "--eval.every", "0", "--train.max_skipped_steps", "2", "--out", str(run_dir)]
    assert cli_main(["train", *args]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and captured.err.startswith("error: training diverged at step ")
    skipped = [r["step"] for r in read_metrics(run_dir) if "skipped" in r]
    assert len(skipped) == 2 and f"at step {skipped[-1] + 1}:" in captured.err
    newest = complete_checkpoints(run_dir)[-1]
    assert f"the newest good checkpoint is {newest};" in captured.err
    assert int(newest.name.split("-")[1]) < skipped[0]  # nothing saved while steps were being skipped
    assert cli_main(["generate", "--run", str(run_dir), "--prompt", "def ", "--max-new-tokens", "4"]) == 0
