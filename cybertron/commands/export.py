"""`cybertron export`: a run's newest checkpoint as a Hugging Face directory, or its adapters in PEFT's format.

    cybertron export --run RUN_DIR --out HF_DIR [--merge] [--dtype bf16]

A whole-model run, or an adapter run with --merge (adapters folded in), is written as a model directory that
loads in `transformers` (AutoModelForCausalLM; a reward run: AutoModelForSequenceClassification). A LoRA, DoRA or
QLoRA run without --merge is written as a PEFT adapter directory over its base, which `peft` loads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cybertron.config import check_dtype, help_text, opt, parse_args, raise_first_failure
from cybertron.errors import UserError
from cybertron.hf_runs import EXPORT_DTYPES, base_is_hf, export_hf, export_peft
from cybertron.runs import read_meta
from cybertron.train.checkpoint import resolve_checkpoint, to_stderr
from cybertron.train.precision import DTYPES


@dataclass
class ExportSection:
    run: str = opt("", "the cybertron run directory to read (its newest checkpoint)")
    out: str = opt("", "the Hugging Face directory to write (new or empty)")
    dtype: str = opt("fp32", "dtype of the written weights: fp32, bf16 or fp16 (torch names work too)", dtype=True)
    merge: bool = opt(False, "fold LoRA/DoRA adapters into plain weights; without it an adapter run is written "
                             "as a PEFT adapter directory (adapter_config.json + adapter_model.safetensors)")


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
    meta = read_meta(resolve_checkpoint(run, report=None).parent.parent)  # the export reports a fallback
    if meta.adapters is None or e.merge:
        print(f"wrote {export_hf(run, Path(e.out), DTYPES[e.dtype])}")
        return 0
    out = export_peft(run, Path(e.out), DTYPES[e.dtype])
    print(f"wrote {out}: {meta.method} adapters in PEFT's format over the base {meta.base_model}")
    if not base_is_hf(run):
        to_stderr(f"note: the base {meta.base_model} is a cybertron run directory: cybertron loads this adapter, "
                  "and `peft` needs the base as a Hugging Face directory (`cybertron export --run BASE --merge`)")
    return 0
