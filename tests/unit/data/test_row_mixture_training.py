"""data.mix in `cybertron finetune` and `cybertron align`: a run interrupted after a checkpoint and resumed
trains on exactly the batches of an uninterrupted one (in-process, bitwise equal losses), and each row comes
from the source the mixture drew."""

import json
import random
import shutil

import pytest

from cybertron.config import parse_args
from tests.conftest import read_metrics

pytest.importorskip("transformers")

from cybertron.align.config import SHORTCUTS as ALIGN_SHORTCUTS  # noqa: E402
from cybertron.align.config import AlignConfig, AlignDataSection  # noqa: E402
from cybertron.align.config import validate as validate_align  # noqa: E402
from cybertron.align.mix import preference_data, prompt_data  # noqa: E402
from cybertron.commands.align import run as run_align  # noqa: E402
from cybertron.commands.finetune import run as run_finetune  # noqa: E402
from cybertron.data.sft import RowMixtureLoader  # noqa: E402
from cybertron.data.tokenizer import TextTokenizer  # noqa: E402
from cybertron.errors import ConfigError  # noqa: E402
from cybertron.finetune.config import SHORTCUTS, FinetuneConfig  # noqa: E402
from cybertron.finetune.config import validate as validate_finetune  # noqa: E402
from tests.unit.finetune.tiny_hf import WORDS, make_hf_dir, write_chats  # noqa: E402

COMMON = ["--steps", "4", "--checkpoint.every", "2", "--eval.every", "0", "--log.every", "1",
          "--log.progress", "lines", "--log.tensorboard", "false", "--checkpoint.async_save", "false",
          "--train.global_batch_size", "4"]


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_hf_dir(tmp_path_factory.mktemp("hf") / "llama")


def write_alpaca(path, n, seed=0):
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    path.write_text("".join(json.dumps({"instruction": words(4), "input": "", "output": words(3)}) + "\n"
                            for _ in range(n)))
    return path


def write_pairs(path, n, seed):
    rng = random.Random(seed)
    words = lambda k: " ".join(rng.choice(WORDS) for _ in range(k))
    path.write_text("".join(json.dumps({"prompt": words(4), "chosen": " " + words(3), "rejected": " " + words(2)})
                            + "\n" for _ in range(n)))
    return path


def interrupted_and_resumed(tmp_path, run, config):
    """Losses by step of an uninterrupted run and of one killed after its step-2 checkpoint, then resumed."""
    full = tmp_path / "full"
    run(config(full, resume=False))
    killed = tmp_path / "killed"
    shutil.copytree(full, killed)
    shutil.rmtree(killed / "checkpoints" / "step-4")
    lines = (killed / "metrics.jsonl").read_text().splitlines()
    (killed / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= 2))
    resumed = run(config(killed, resume=True))
    # The resumed run continued from its checkpoint (logged steps 3 and 4 once each) on the mixture's loader.
    assert [r["step"] for r in read_metrics(killed) if "loss" in r] == [1, 2, 3, 4]
    assert isinstance(resumed.task.loader, RowMixtureLoader) and sum(resumed.task.loader.per_source) == 16
    losses = lambda run_dir: {r["step"]: r["loss"] for r in read_metrics(run_dir) if "loss" in r}
    return losses(full), losses(killed)


def test_finetune_mixture_resumes_exactly(tmp_path, hf_dir):
    chats = write_chats(tmp_path / "chats.jsonl", n=10)
    alpaca = write_alpaca(tmp_path / "alpaca.jsonl", 10)
    (tmp_path / "run.toml").write_text(f'[[data.mix]]\npath = "{chats}"\nweight = 3\n'
                                       f'[[data.mix]]\npath = "{alpaca}"\nformat = "alpaca"\n')

    def config(out, resume):
        args = ["--config", str(tmp_path / "run.toml"), "--model", str(hf_dir), "--seq-len", "64",
                "--data.pack", "false", "--data.val_fraction", "0", "--out", str(out), *COMMON,
                *(["--resume"] if resume else [])]
        cfg = parse_args(args, FinetuneConfig(), SHORTCUTS)
        validate_finetune(cfg)
        return cfg

    expected, got = interrupted_and_resumed(tmp_path, run_finetune, config)
    assert sorted(got) == [1, 2, 3, 4] and got == expected  # bitwise: float equality of every step's loss


def test_dpo_mixture_resumes_exactly(tmp_path, hf_dir):
    a, b = write_pairs(tmp_path / "a.jsonl", 10, seed=1), write_pairs(tmp_path / "b.jsonl", 6, seed=2)

    def config(out, resume):
        args = [f"--model.path={hf_dir}", f"--data.mix=path={a},weight=2", f"--data.mix=path={b}",
                "--data.seq_len=48", f"--run.out={out}", *COMMON, *(["--run.resume=true"] if resume else [])]
        cfg = parse_args(args, AlignConfig(), ALIGN_SHORTCUTS)
        validate_align(cfg)
        return cfg

    expected, got = interrupted_and_resumed(tmp_path, run_align, config)
    assert sorted(got) == [1, 2, 3, 4] and got == expected


def test_preference_and_prompt_mixtures_keep_each_source_in_turn(tmp_path, hf_dir):
    tokenizer = TextTokenizer.load(hf_dir)
    a, b = write_pairs(tmp_path / "a.jsonl", 10, seed=1), write_pairs(tmp_path / "b.jsonl", 5, seed=2)
    d = AlignDataSection(mix=[{"path": str(a), "weight": "2"}, {"path": str(b)}], val_fraction=0.2)
    data, mixture = preference_data(d, tokenizer, 48, seed=0)
    assert mixture.sizes == (8, 4) and mixture.weights == (2.0, 1.0)
    alone = [preference_data(AlignDataSection(path=str(p), val_fraction=0.2), tokenizer, 48, 0)[0] for p in (a, b)]
    for key in ("chosen_ids", "rejected_len"):  # source a's rows, then b's, each as it reads alone
        for rows, single, lo in [(data.train, alone[0].train, 0), (data.train, alone[1].train, 8)]:
            n, width = single[key].shape[0], single[key].shape[-1] if single[key].dim() == 2 else None
            got = rows[key][lo:lo + n]
            assert (got[:, :width] if width else got).equal(single[key])
    train, val, n_read, _, mixture = prompt_data(d, tokenizer, 40, seed=0)
    assert (mixture.sizes, len(val), n_read) == ((8, 4), 3, 15)
    assert [r.source for r in train[:8]] == [r.source for r in prompt_data(
        AlignDataSection(path=str(a), val_fraction=0.2), tokenizer, 40, 0)[0]]


def test_align_and_finetune_reject_a_path_and_a_mix_together():
    with pytest.raises(ConfigError, match="give data.path .* or data.mix, not both"):
        validate_align(parse_args(["--model.path=m", "--data.path=d", "--data.mix=path=e"], AlignConfig()))
    with pytest.raises(ConfigError, match="data.mix x.jsonl: format must be one of"):
        validate_finetune(parse_args(["--model.path=m", "--data.mix=path=x.jsonl,format=csv"], FinetuneConfig()))


def test_align_reads_a_split_of_a_saved_dataset(tmp_path, hf_dir):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in write_pairs(tmp_path / "p.jsonl", 6, seed=3).read_text().splitlines()]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows[2:])}).save_to_disk(str(tmp_path / "saved"))
    d = AlignDataSection(path=str(tmp_path / "saved"), split="test", val_fraction=0.0)
    data, mixture = preference_data(d, TextTokenizer.load(hf_dir), 48, seed=0)
    assert mixture is None and data.n_pairs == 4
