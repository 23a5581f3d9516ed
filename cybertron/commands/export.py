"""`cybertron export`: a run's newest checkpoint as a Hugging Face directory, adapters folded in.

    cybertron export --out RUN_DIR --to HF_DIR --merge [--dtype bfloat16]

The directory loads in `transformers` (AutoModelForCausalLM; a reward run: AutoModelForSequenceClassification).
"""

from __future__ import annotations

from pathlib import Path

from cybertron.config import ArgumentParser
from cybertron.errors import UserError
from cybertron.hf_runs import DTYPES, export_hf
from cybertron.runs import read_meta
from cybertron.train.checkpoint import resolve_checkpoint


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="cybertron export",
                            description="write a run as a Hugging Face directory (adapters merged)")
    parser.add_argument("--out", type=Path, metavar="RUN_DIR", required=True, help="the cybertron run directory")
    parser.add_argument("--to", type=Path, metavar="HF_DIR", help="Hugging Face directory to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    parser.add_argument("--merge", action="store_true", help="fold LoRA/DoRA adapters into plain weights")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    if args.to is None:
        raise UserError("cybertron export: --to HF_DIR is required")
    if not args.out.is_dir():
        raise UserError(f"--out {args.out} is not a directory; give a cybertron run directory")
    meta = read_meta(resolve_checkpoint(args.out).parent.parent)
    if meta.adapters is not None and not args.merge:
        raise UserError(f"{args.out} holds {meta.method} adapters only; pass --merge to fold them into the "
                        "base weights (a separate adapter-only export is not supported)")
    print(f"wrote {export_hf(args.out, args.to, DTYPES[args.dtype])}")
    return 0
