"""`cybertron convert`: a Hugging Face directory <-> a cybertron run directory.

    cybertron convert --from-hf HF_DIR --out RUN_DIR     an HF model as a run dir with a step-0 checkpoint
    cybertron convert --out RUN_DIR --to HF_DIR          a run's newest checkpoint as an HF directory
"""

from __future__ import annotations

from pathlib import Path

from cybertron.config import ArgumentParser
from cybertron.errors import UserError
from cybertron.hf_runs import DTYPES, convert_from_hf, export_hf


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="cybertron convert",
                            description="convert between a Hugging Face directory and a cybertron run")
    parser.add_argument("--out", type=Path, metavar="RUN_DIR", required=True, help="the cybertron run directory")
    parser.add_argument("--to", type=Path, metavar="HF_DIR", help="Hugging Face directory to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    parser.add_argument("--from-hf", type=Path, metavar="HF_DIR", help="Hugging Face directory to read")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if (args.from_hf is None) == (args.to is None):
        raise UserError("cybertron convert: give exactly one of --from-hf HF_DIR (HF -> run) or --to HF_DIR "
                        "(run -> HF)")
    if args.from_hf is not None:
        ckpt = convert_from_hf(args.from_hf, args.out)
        print(f"converted {args.from_hf} to checkpoint {ckpt}")
    else:
        print(f"wrote {export_hf(args.out, args.to, DTYPES[args.dtype])}")
    return 0
