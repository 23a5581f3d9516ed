"""`cybertron eval`: perplexity on text files and lm-evaluation-harness tasks, for a run or a Hugging Face model.

    cybertron eval MODEL --perplexity FILE [FILE ...] [--seq-len N] [--stride S] [--batch-size B] [--dtype bf16]
    cybertron eval MODEL --tasks hellaswag,arc_easy [--num-fewshot K] [--limit N] [--include-path DIR]

MODEL is what `cybertron generate --model` takes: a run directory (its newest checkpoint), a Hugging Face model
directory or a PEFT adapter directory. The results file is RUN_DIR/eval/<name>.json for a run, and
--out DIR/<name>.json otherwise (--out is required then); <name> is --name or the UTC time.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

from cybertron.config import help_text, opt, parse_args, raise_first_failure
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import UserError
from cybertron.eval.perplexity import perplexity_of_files
from cybertron.eval.results import EVAL_DIR, default_name, results_file, write_results
from cybertron.eval.tasks import TaskRequest, load_tasks, run_tasks
from cybertron.finetune.peft_format import is_peft_dir
from cybertron.models.llama import Transformer
from cybertron.runs import is_hf_dir, load_for_inference
from cybertron.serve.options import MODEL_SHORTCUTS, ModelSourceSection, validate_source
from cybertron.train.checkpoint import resolve_checkpoint
from cybertron.train.precision import DTYPES


@dataclass
class EvalSection:
    perplexity: list[str] = opt([], "text, .jsonl or .parquet files to measure perplexity on (each file one token "
                                    "stream of its documents, eos-separated)")
    text_field: str = opt("text", "the field of a .jsonl/.parquet record that holds the text")
    seq_len: int = opt(0, "perplexity window in tokens (0 = the model's context)")
    stride: int = opt(0, "target tokens per window (0 = seq_len: non-overlapping windows, each token scored "
                         "once; smaller slides the window for more context per token at seq_len/stride the cost)")
    batch_size: int = opt(8, "sequences per forward pass (and generations at once)")
    tasks: str = opt("", "lm-evaluation-harness task names, comma-separated (needs the [eval] extra)")
    num_fewshot: int | None = opt(None, "few-shot examples per task prompt (default: the task's own)")
    limit: int | None = opt(None, "evaluate at most this many examples per task")
    include_path: str = opt("", "a directory of your own lm_eval task YAML files")
    builtin_tasks: bool = opt(True, "index lm_eval's built-in tasks (false: only those under include_path; "
                                    "indexing the built-in ones takes seconds)")
    seed: int = opt(1234, "seed of lm_eval's few-shot example sampler")
    out: str = opt("", "directory for the results file (default: RUN_DIR/eval for a run; required otherwise)")
    name: str = opt("", "results file name without .json (default: the UTC time)")


@dataclass
class EvalConfig:
    model: ModelSourceSection = field(default_factory=ModelSourceSection)
    eval: EvalSection = field(default_factory=EvalSection)


SHORTCUTS = {**MODEL_SHORTCUTS, "--perplexity": "eval.perplexity", "--text-field": "eval.text_field",
             "--seq-len": "eval.seq_len", "--stride": "eval.stride", "--batch-size": "eval.batch_size",
             "--tasks": "eval.tasks", "--num-fewshot": "eval.num_fewshot", "--limit": "eval.limit",
             "--include-path": "eval.include_path", "--out": "eval.out", "--name": "eval.name"}


def normalize_argv(argv: list[str]) -> list[str]:
    """`eval MODEL ...` -> `--model MODEL ...`; `--perplexity A B` -> `--perplexity A --perplexity B`."""
    out, rest = (["--model", argv[0]], argv[1:]) if argv and not argv[0].startswith("-") else ([], argv)
    i = 0
    while i < len(rest):
        out.append(rest[i])
        if rest[i] == "--perplexity":
            while i + 2 < len(rest) and not rest[i + 2].startswith("--"):
                out += [rest[i + 1], "--perplexity"]
                i += 1
        i += 1
    return out


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__.strip() + "\n\n" + help_text(EvalConfig(), "eval", SHORTCUTS))
        return 0
    cfg = parse_args(normalize_argv(argv), EvalConfig(), SHORTCUTS)
    e = cfg.eval
    tasks = [t.strip() for t in e.tasks.split(",") if t.strip()]
    raise_first_failure([
        (bool(e.perplexity or tasks), "nothing to evaluate: give --perplexity FILE [FILE ...] and/or --tasks NAME"),
        (e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}"),
        (e.seq_len >= 0 and e.stride >= 0, "eval.seq_len and eval.stride must be >= 0 (0 = the default)"),
        (e.limit is None or e.limit >= 1, f"eval.limit must be >= 1, got {e.limit}"),
        (e.num_fewshot is None or e.num_fewshot >= 0, f"eval.num_fewshot must be >= 0, got {e.num_fewshot}"),
    ])
    device = validate_source(cfg.model)
    for file in e.perplexity:
        if not Path(file).is_file():
            raise UserError(f"--perplexity {file} is not a file; give text, .jsonl or .parquet files")
    out_path = results_file(results_dir(cfg), e.name or default_name())
    request = TaskRequest(tasks, e.num_fewshot, e.include_path, e.builtin_tasks, e.seed)
    loaded = load_tasks(request) if tasks else None  # a missing extra, unknown task or absent data fails first
    model, tokenizer, name = load_for_inference(*cfg.model.source(), device=device, dtype=cfg.model.dtype)
    if cfg.model.dtype != "auto":  # a run loads in its checkpoint's dtype; --dtype applies to it too here
        model = model.to(DTYPES[cfg.model.dtype])
    weights = next(model.parameters())
    record = {"model": str(cfg.model.source()[0].resolve()), "model_name": name,
              "device": str(weights.device), "dtype": str(weights.dtype).removeprefix("torch."),
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "config": {section: dataclasses.asdict(getattr(cfg, section)) for section in ("model", "eval")}}
    if e.perplexity:
        record["perplexity"] = measure_perplexity(e, model, tokenizer)
    if tasks:
        record["lm_eval"] = run_tasks(model, tokenizer, loaded, e.limit, e.batch_size)
        print_task_metrics(record["lm_eval"]["results"])
    print(f"results: {write_results(out_path, record)}")
    return 0


def measure_perplexity(e: EvalSection, model: Transformer, tokenizer: TextTokenizer) -> dict:
    """The results file's perplexity section (windows, per-file and total results), each file printed."""
    seq_len = e.seq_len or model.config.max_seq_len
    if seq_len > model.config.max_seq_len:
        raise UserError(f"--seq-len {seq_len} exceeds the model's context of {model.config.max_seq_len}")
    stride = e.stride or seq_len
    if stride > seq_len:
        raise UserError(f"--stride {stride} exceeds --seq-len {seq_len}; use at most {seq_len}")
    section = {"seq_len": seq_len, "stride": stride, **perplexity_of_files(
        model, tokenizer, [Path(f) for f in e.perplexity], seq_len, stride, e.batch_size, e.text_field)}
    for file, result in section["files"].items():
        print(f"perplexity {file}: {result['perplexity']:.4f} ({result['tokens']} tokens)")
    return section


def print_task_metrics(results: dict) -> None:
    for task, metrics in results.items():
        for metric, value in metrics.items():
            if metric not in ("alias", "sample_len") and "_stderr" not in metric and isinstance(value, (int, float)):
                print(f"{task} {metric.removesuffix(',none')}: {value:.4f}")


def results_dir(cfg: EvalConfig) -> Path:
    """--out if given; else a run's eval/ folder; a Hugging Face or PEFT directory needs --out."""
    if cfg.eval.out:
        return Path(cfg.eval.out)
    source, _ = cfg.model.source()
    if not source.is_dir():
        raise UserError(f"--model {source} is not a directory; give a run directory or a Hugging Face model "
                        "directory")
    if is_hf_dir(source) or is_peft_dir(source):
        raise UserError(f"{source} is not a cybertron run directory, so it has no eval/ folder for the results; "
                        "give --out DIR")
    return resolve_checkpoint(source, report=None).parent.parent / EVAL_DIR
