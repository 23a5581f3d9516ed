"""`cybertron convert`: a Hugging Face directory <-> a cybertron run directory.

    cybertron convert --from-hf HF_DIR --out RUN_DIR     an HF model as a run dir with a step-0 checkpoint
    cybertron convert --run RUN_DIR --out HF_DIR         a run's newest checkpoint as an HF directory (as
                                                         `cybertron export`, adapters merged)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from cybertron.config import check_dtype, help_text, opt, parse_args, raise_first_failure
from cybertron.hf_runs import EXPORT_DTYPES, convert_from_hf, export_hf
from cybertron.train.precision import DTYPES


@dataclass
class ConvertSection:
    from_hf: str = opt("", "a Hugging Face directory to read (HF -> run)")
    run: str = opt("", "a cybertron run directory to read (run -> HF)")
    out: str = opt("", "the directory to write: a run directory (with from_hf) or an HF directory (with run)")
    dtype: str = opt("fp32", "dtype of the weights written to an HF directory: fp32, bf16 or fp16", dtype=True)


@dataclass
class ConvertConfig:
    convert: ConvertSection = field(default_factory=ConvertSection)


SHORTCUTS = {"--from-hf": "convert.from_hf", "--run": "convert.run", "--out": "convert.out",
             "--dtype": "convert.dtype"}
# Before, `convert --out RUN --to HF` read the run from --out: `--to` now names the new spelling instead.
RENAMED = {"--to": "--to is gone: `cybertron convert --run RUN_DIR --out HF_DIR` (--out is the directory "
                   "written)"}


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(help_text(ConvertConfig(), "convert", SHORTCUTS))
        return 0
    c = parse_args(argv, ConvertConfig(), SHORTCUTS, RENAMED).convert
    raise_first_failure([
        (bool(c.from_hf) != bool(c.run), "give exactly one of --from-hf HF_DIR (HF -> run) or --run RUN_DIR "
                                         "(run -> HF), with --out the directory to write"),
        (bool(c.out), "--out is required: the directory to write"),
        check_dtype("convert.dtype", c.dtype, EXPORT_DTYPES),
    ])
    if c.from_hf:
        ckpt = convert_from_hf(Path(c.from_hf), Path(c.out))
        print(f"converted {c.from_hf} to checkpoint {ckpt}")
    else:
        print(f"wrote {export_hf(Path(c.run), Path(c.out), DTYPES[c.dtype])}")
    return 0
