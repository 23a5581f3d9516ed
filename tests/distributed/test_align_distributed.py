"""`cybertron align` on 2 gloo ranks (DDP, ZeRO-3, tensor parallelism with and without sequence and loss
parallelism) against the same run in one process: the same losses, gradient norms, rewards and held-out
metrics, and checkpoints that resume in one process. Default: reward-full-tp2 and GRPO
under ZeRO-3; the rest with `-m slow`."""

from __future__ import annotations

import shutil

import pytest

from tests.conftest import read_metrics
from tests.distributed.test_train_cli_distributed import _run

pytestmark = pytest.mark.distributed
pytest.importorskip("transformers")

from tests.e2e.test_align_cli import write_arithmetic  # noqa: E402
from tests.unit.align.test_dpo import write_color_pairs  # noqa: E402
from tests.unit.finetune.tiny_hf import make_hf_dir  # noqa: E402

COMMON = ["--log.progress", "lines", "--log.tensorboard", "false", "--log.every", "1", "--train.dtype", "fp32"]


def _steps(run_dir, keys):
    return {r["step"]: [r[k] for k in keys] for r in read_metrics(run_dir) if "loss" in r}


def _close(got: dict, expected: dict, tol: float) -> None:
    assert sorted(got) == sorted(expected)
    for step in got:
        for a, b in zip(got[step], expected[step]):
            assert abs(a - b) <= tol * max(1.0, abs(b)), (step, got[step], expected[step])


@pytest.fixture(scope="module")
def prefs(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefs")
    return make_hf_dir(root / "hf"), write_color_pairs(root / "prefs.jsonl", 40, seed=3)


# Adam's first step moves each weight by lr x g / (|g| + eps): for the few gradients of a few eps (1e-8) the
# fp32 noise of another summation order (tensor parallelism splits every matmul) becomes a visible share of
# an update (measured: g 3.8e-8 vs 3.4e-8 in a full-weight reward model, then 1.4e-5 on the next grad norm).
# A larger eps keeps the comparison about the layout, not about Adam's division by near-zero moments.
ADAM_EPS = ["--train.eps", "1e-6"]
DP = "--parallel.data_parallel"
# layout -> (flags, the layout as the announcement describes it)
LAYOUTS = {"ddp": ([DP, "ddp"], "ddp dp_replicate=2"), "zero3": ([DP, "zero3"], "zero3 dp_shard=2"),
           # tensor parallelism with sequence and loss parallelism (the defaults): vocabulary-sharded
           # log-probabilities, sequence-sharded hidden states gathered for the reward head, padded pairs
           "tp2": (["--parallel.tp", "2"], "ddp tp=2"),
           "tp2-plain": (["--parallel.tp", "2", "--parallel.sequence_parallel", "false",
                          "--parallel.loss_parallel", "false"], "ddp tp=2")}


# The default run keeps one case per method and layout; the other combinations run with `-m slow`.
@pytest.mark.parametrize("method, weights, layout", [
    ("reward", "full", "tp2"),
    # DPO's sharded log-probs run by default in test_vocab_parallel_logprobs.py, LoRA under tp in
    # test_adapters_parallel.py
    pytest.param("dpo", "lora", "tp2", marks=pytest.mark.slow),
    pytest.param("reward", "lora", "zero3", marks=pytest.mark.slow),  # zero3 by default: GRPO and finetune
    pytest.param("dpo", "lora", "ddp", marks=pytest.mark.slow),  # finetune's default run has lora under ddp
    pytest.param("dpo", "full", "zero3", marks=pytest.mark.slow),  # full ZeRO-3: finetune's default test has it
    pytest.param("dpo", "full", "tp2", marks=pytest.mark.slow),
    pytest.param("simpo", "lora", "tp2-plain", marks=pytest.mark.slow),
    pytest.param("reward", "lora", "ddp", marks=pytest.mark.slow),
    pytest.param("reward", "lora", "tp2", marks=pytest.mark.slow),
    pytest.param("reward", "full", "tp2-plain", marks=pytest.mark.slow),
    pytest.param("reward", "full", "zero3", marks=pytest.mark.slow)])
def test_preference_methods_match_one_process(prefs, tmp_path, method, weights, layout):
    hf, data = prefs
    flags, described = LAYOUTS[layout]
    args = ["align", "--method", method, "--model", str(hf), "--data", str(data), "--weights", weights,
            "--steps", "4", "--lr", "2e-3", "--train.global_batch_size", "8", "--train.micro_batch_size", "2",
            "--data.val_fraction", "0.2", "--eval.every", "2", "--checkpoint.every", "2", *COMMON, *ADAM_EPS]
    _run([*args, "--out", str(tmp_path / "one")])
    two = _run([*args, *flags, "--out", str(tmp_path / "two")], torchrun=2)
    assert f"2 ranks ({described})" in two.stdout and two.stdout.count("done: step") == 1
    keys = ["loss", "grad_norm", "accuracy" if method == "reward" else "reward_margin"]
    _close(_steps(tmp_path / "two", keys), _steps(tmp_path / "one", keys), 1e-5)
    val = lambda run: [r["val_loss"] for r in read_metrics(run) if "val_loss" in r]
    assert val(tmp_path / "two") == pytest.approx(val(tmp_path / "one"), abs=1e-5)

    # The 2-rank checkpoint of step 2 resumes in one process and ends where the 1-process run ended.
    shutil.rmtree(tmp_path / "two" / "checkpoints" / "step-4")
    _run([*args, "--out", str(tmp_path / "two"), "--resume"])
    _close(_steps(tmp_path / "two", keys), _steps(tmp_path / "one", keys), 1e-5)


@pytest.fixture(scope="module")
def grpo_run(tmp_path_factory):
    """A tiny base trained on arithmetic, the GRPO arguments and their one-process run. The stop string ends
    completions at different lengths, so ranks have uneven work."""
    root = tmp_path_factory.mktemp("arith")
    write_arithmetic(root)
    _run(["train", "--data.path", str(root / "arith.jsonl"), "--data.cache_dir", str(root / "cache"),
          "--data.vocab_size", "300", "--data.seq_len", "64", "--model.preset", "debug", "--steps", "60",
          "--train.global_batch_size", "16", "--train.lr", "3e-3", "--out", str(root / "base"), "--eval.every", "0",
          "--log.progress", "lines", "--log.tensorboard", "false"])
    args = ["align", "--method", "grpo", "--model", str(root / "base"), "--data", str(root / "prompts.jsonl"),
            "--reward", f"{root / 'reward.py'}:correct", "--steps", "4", "--train.global_batch_size", "4",
            "--align.group_size", "4", "--align.max_new_tokens", "6", "--align.stop", "\\n",
            "--data.val_fraction", "0", "--lr", "1e-3", "--align.check_logprobs", "true", *COMMON]
    _run([*args, "--out", str(root / "one")])
    return root, args


GRPO_KEYS = ["loss", "grad_norm", "reward", "reward_std", "kl", "completion_len"]


@pytest.mark.slow  # ddp generation is what one process does; the default run has the sharded zero3 case
def test_grpo_ddp_generates_and_trains_like_one_process(grpo_run, tmp_path):
    root, args = grpo_run
    _run([*args, "--out", str(tmp_path / "two")], torchrun=2)
    # Each rank samples exactly what one process samples for its prompts (seeds by global position).
    _close(_steps(tmp_path / "two", GRPO_KEYS), _steps(root / "one", GRPO_KEYS), 1e-5)


def test_grpo_zero3_generates_from_sharded_weights_like_one_process(grpo_run, tmp_path):
    """Under ZeRO-3 the engine runs the FSDP2-sharded policy (each block gathered in its forward), both ranks
    in lockstep. align.check_logprobs makes every training micro-batch assert that the generator's token
    log-probabilities equal the trainer's within 1e-5 (GRPOStep raises LogprobMismatch, the run fails)."""
    root, args = grpo_run
    two = _run([*args, "--parallel.data_parallel", "zero3", "--out", str(tmp_path / "two")], torchrun=2)
    assert "2 ranks (zero3" in two.stdout
    _close(_steps(tmp_path / "two", GRPO_KEYS), _steps(root / "one", GRPO_KEYS), 1e-5)
    rows = [r for r in read_metrics(tmp_path / "two") if "loss" in r]
    assert max(r["logprob_gap"] for r in rows) <= 1e-5
    assert sum(r["idle_forwards"] for r in rows) > 0  # some rank waited on the other: lockstep was needed


@pytest.mark.slow
def test_grpo_zero3_full_weights_with_a_sharded_reference(grpo_run, tmp_path):
    """Full training keeps a frozen KL reference; under ZeRO-3 it is sharded too (parallel/apply.shard_frozen)
    and its log-probabilities come from gathered blocks, as the policy's."""
    root, args = grpo_run
    full = [*args, "--weights", "full"]  # align.kl_coef is 0.04 by default: the reference is used
    _run([*full, "--out", str(tmp_path / "one")])
    _run([*full, "--parallel.data_parallel", "zero3", "--out", str(tmp_path / "two")], torchrun=2)
    _close(_steps(tmp_path / "two", GRPO_KEYS), _steps(tmp_path / "one", GRPO_KEYS), 1e-5)
    assert all(r["kl"] > 0 for r in read_metrics(tmp_path / "two") if "loss" in r and r["step"] > 1)


@pytest.mark.slow
@pytest.mark.parametrize("weights", ["lora", "full"])  # full: the frozen KL reference is tensor-parallel too
def test_grpo_tp2_generates_from_tensor_parallel_weights_like_one_process(tmp_path, weights):
    """Under tp 2 the engine runs the tensor-parallel policy (each rank holds half of every projection and of the
    KV heads); both ranks generate the same prompts with the same seeds. Generator and trainer log-probabilities
    are asserted equal at every micro-batch (align.check_logprobs)."""
    make_hf_dir(tmp_path / "hf")  # a random tiny model: completions vary, and so does a length reward
    write_arithmetic(tmp_path)
    (tmp_path / "length.py").write_text("def length(prompts, completions, **fields):\n"
                                        "    return [float(len(c)) for c in completions]\n")
    args = ["align", "--method", "grpo", "--model", str(tmp_path / "hf"), "--data", str(tmp_path / "prompts.jsonl"),
            "--reward", f"{tmp_path / 'length.py'}:length", "--steps", "3", "--train.global_batch_size", "4",
            "--align.group_size", "4", "--align.max_new_tokens", "6", "--data.val_fraction", "0", "--lr", "1e-2",
            "--align.check_logprobs", "true", "--weights", weights, *COMMON]
    _run([*args, "--out", str(tmp_path / "one")])
    two = _run([*args, "--parallel.tp", "2", "--parallel.sequence_parallel", "false", "--parallel.loss_parallel",
                "false", "--out", str(tmp_path / "two")], torchrun=2)
    assert "tp=2" in two.stdout
    _close(_steps(tmp_path / "two", GRPO_KEYS), _steps(tmp_path / "one", GRPO_KEYS), 1e-5)
    assert any(r["grad_norm"] > 0 and r["kl"] > 0 for r in read_metrics(tmp_path / "two") if "loss" in r)


def test_layouts_that_cannot_run_fail_before_any_process_starts(prefs, tmp_path, capsys):
    from cybertron.cli import main as cli_main

    hf, data = prefs
    base = ["align", "--model", str(hf), "--data", str(data), "--out", str(tmp_path / "x"), "--nproc", "2"]
    assert cli_main([*base, "--method", "grpo", "--reward", "r.py:f", "--parallel.data_parallel", "zero2"]) == 2
    assert cli_main([*base, "--method", "grpo", "--reward", "r.py:f", "--parallel.tp", "2"]) == 2  # sp, lp on
    assert "grpo with parallel.tp > 1" in capsys.readouterr().err
    assert cli_main([*base, "--parallel.pp", "2"]) == 2
    err = capsys.readouterr().err
    assert "splits no pipeline stages" in err and len(err.strip().splitlines()) == 1
    assert cli_main([*base, "--train.global_batch_size", "7"]) == 2
    assert cli_main([*base, "--parallel.tp", "3"]) == 2  # does not divide the world size
    assert not (tmp_path / "x").exists()


# ---- ppo (h10): the critic's value head is a root parameter, sharded by FSDP2 with the policy ----------------

PPO_KEYS = ["loss", "grad_norm", "reward", "reward_std", "value", "value_loss", "completion_len"]


@pytest.mark.slow
def test_ppo_zero3_generates_and_trains_with_its_critic_like_one_process(grpo_run, tmp_path):
    """PPO under ZeRO-3 against one process: rollouts from the sharded policy (log-probabilities asserted equal
    to the trainer's), values from the sharded value head, GAE advantages normalised over both ranks' tokens."""
    root, args = grpo_run
    ppo = [*args, "--method", "ppo", "--align.updates_per_rollout", "2", "--steps", "4"]
    _run([*ppo, "--out", str(tmp_path / "one")])
    two = _run([*ppo, "--parallel.data_parallel", "zero3", "--out", str(tmp_path / "two")], torchrun=2)
    assert "2 ranks (zero3" in two.stdout
    _close(_steps(tmp_path / "two", PPO_KEYS), _steps(tmp_path / "one", PPO_KEYS), 1e-5)
    assert any(r["value"] != 0 for r in read_metrics(tmp_path / "two") if "loss" in r)
