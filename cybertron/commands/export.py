"""`cybertron export`: a run's newest checkpoint as a Hugging Face directory, adapters folded in.

    cybertron export --run RUN_DIR --out HF_DIR [--merge] [--dtype bf16]

The directory loads in `transformers` (AutoModelForCausalLM; a reward run: AutoModelForSequenceClassification).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cybertron.config import check_dtype, help_text, opt, parse_args, raise_first_failure
from cybertron.errors import UserError
from cybertron.hf_runs import EXPORT_DTYPES, export_hf
from cybertron.runs import read_meta
from cybertron.train.checkpoint import resolve_checkpoint
from cybertron.train.precision import DTYPES


@dataclass
class ExportSection:
    run: str = opt("", "the cybertron run directory to read (its newest checkpoint)")
    out: str = opt("", "the Hugging Face directory to write (new or empty)")
    dtype: str = opt("fp32", "dtype of the written weights: fp32, bf16 or fp16 (torch names work too)", dtype=True)
    merge: bool = opt(False, "fold LoRA/DoRA adapters into plain weights (required for an adapter run)")


@dataclass
class ExportConfig:
    export: ExportSection = field(default_factory=ExportSection)


SHORTCUTS = {"--run": "export.run", "--out": "export.out", "--dtype": "export.dtype", "--merge": "export.merge"}
# Before, the run was read from --out and written to --to: `--to` now names the new spelling instead.
RENAMED = {"--to": "--to is gone: `cybertron export --run RUN_DIR --out HF_DIR` (--out is the directory written)"}


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text(ExportConfig(), "export", SHORTCUTS))
        return 0
    e = parse_args(argv, ExportConfig(), SHORTCUTS, RENAMED).export
    raise_first_failure([
        (bool(e.run), "--run RUN_DIR is required: `cybertron export --run RUN_DIR --out HF_DIR`"),
        (bool(e.out), "--out HF_DIR is required: the Hugging Face directory to write"),
        check_dtype("export.dtype", e.dtype, EXPORT_DTYPES),
    ])
    run = Path(e.run)
    if not run.is_dir():
        raise UserError(f"--run {run} is not a directory; give a cybertron run directory")
    meta = read_meta(resolve_checkpoint(run).parent.parent)
    if meta.adapters is not None and not e.merge:
        raise UserError(f"{run} holds {meta.method} adapters only; pass --merge to fold them into the "
                        "base weights (a separate adapter-only export is not supported)")
    print(f"wrote {export_hf(run, Path(e.out), DTYPES[e.dtype])}")
    return 0
