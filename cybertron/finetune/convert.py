"""`cybertron convert` (HF directory <-> run directory) and `cybertron export` (run -> merged HF directory).

    cybertron convert --from-hf HF_DIR --out RUN_DIR     an HF model as a run dir with a step-0 checkpoint
    cybertron convert --out RUN_DIR --to HF_DIR          a run's newest checkpoint as an HF directory
    cybertron export --out RUN_DIR --to HF_DIR --merge   the same, folding LoRA/DoRA adapters into the weights

The HF directory written holds config.json, safetensors and the tokenizer files, and loads in
`transformers.AutoModelForCausalLM.from_pretrained` with the same logits as cybertron's model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cybertron.errors import UserError
from cybertron.finetune.loading import load_finetuned_model, read_finetune_meta
from cybertron.finetune.run import copy_tokenizer_files
from cybertron.models.hf import SpecialTokenIds, load_hf_model, save_hf_model
from cybertron.serve.loading import ArgumentParser
from cybertron.train import checkpoint as ckpt_io

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def convert_from_hf(hf_dir: Path, run_dir: Path) -> Path:
    """Write `hf_dir`'s weights as checkpoint step-0 of a new run directory, with its tokenizer files;
    returns the checkpoint. `cybertron generate --out RUN_DIR` and `train --model.init_from` both work."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not hf_dir.is_dir():
        raise UserError(f"--from-hf {hf_dir} is not a directory; give a Hugging Face model directory")
    if ckpt_io.latest_checkpoint(run_dir) is not None:
        raise UserError(f"{run_dir} already holds checkpoints; choose another --out")
    if not (hf_dir / "tokenizer.json").is_file():
        raise UserError(f"{hf_dir} has no tokenizer.json; a run directory needs the model's tokenizer")
    model = load_hf_model(hf_dir)
    copy_tokenizer_files(hf_dir, run_dir)
    return ckpt_io.save_checkpoint(run_dir, 0, model, None, {"converted_from": str(hf_dir.resolve())},
                                   model.config, keep=1)


def export_hf(run_dir: Path, hf_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A run's newest checkpoint (adapters merged into the base) as a Hugging Face directory."""
    hf_dir = Path(hf_dir)
    if hf_dir.exists() and any(hf_dir.iterdir()):
        raise UserError(f"--to {hf_dir} exists and is not empty; choose a new directory")
    root = ckpt_io.resolve_checkpoint(Path(run_dir)).parent.parent
    copy_tokenizer_files(root, hf_dir)  # first: save_hf_model extends the base's generation_config.json
    from cybertron.align.reward import is_reward_run

    if is_reward_run(root):  # a reward model: a *ForSequenceClassification directory
        from cybertron.align.reward import load_reward_model, save_reward_hf
        from cybertron.data.tokenizer import TextTokenizer
        from cybertron.finetune.lora import merge_lora_

        tokenizer = TextTokenizer.load(root)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        save_reward_hf(merge_lora_(load_reward_model(Path(run_dir), "cpu")), hf_dir, pad, dtype)
    else:
        model, tokenizer = load_finetuned_model(Path(run_dir), "cpu", merge=True)
        generation = hf_dir / "generation_config.json"
        save_hf_model(model.state_dict(), model.config, hf_dir, dtype=dtype,
                      special_ids=SpecialTokenIds(tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id),
                      generation_defaults=json.loads(generation.read_text()) if generation.is_file() else None)
    if not (hf_dir / "tokenizer.json").is_file():
        tokenizer.save(hf_dir)
    return hf_dir


def _parser(prog: str, description: str) -> ArgumentParser:
    parser = ArgumentParser(prog=prog, description=description)
    parser.add_argument("--out", type=Path, metavar="RUN_DIR", required=True, help="the cybertron run directory")
    parser.add_argument("--to", type=Path, metavar="HF_DIR", help="Hugging Face directory to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="dtype of the written weights")
    return parser


def main(argv: list[str]) -> int:
    """`cybertron convert`: --from-hf HF_DIR --out RUN_DIR, or --out RUN_DIR --to HF_DIR."""
    parser = _parser("cybertron convert", "convert between a Hugging Face directory and a cybertron run")
    parser.add_argument("--from-hf", type=Path, metavar="HF_DIR", help="Hugging Face directory to read")
    args = parser.parse_args(argv)
    if (args.from_hf is None) == (args.to is None):
        raise UserError("cybertron convert: give exactly one of --from-hf HF_DIR (HF -> run) or --to HF_DIR "
                        "(run -> HF)")
    if args.from_hf is not None:
        ckpt = convert_from_hf(args.from_hf, args.out)
        print(f"converted {args.from_hf} to checkpoint {ckpt}")
    else:
        print(f"wrote {export_hf(args.out, args.to, DTYPES[args.dtype])}")
    return 0


def export_main(argv: list[str]) -> int:
    """`cybertron export --out RUN_DIR --to HF_DIR [--merge]`."""
    parser = _parser("cybertron export", "write a run as a Hugging Face directory (adapters merged)")
    parser.add_argument("--merge", action="store_true", help="fold LoRA/DoRA adapters into plain weights")
    args = parser.parse_args(argv)
    if args.to is None:
        raise UserError("cybertron export: --to HF_DIR is required")
    if not args.out.is_dir():
        raise UserError(f"--out {args.out} is not a directory; give a cybertron run directory")
    meta = read_finetune_meta(ckpt_io.resolve_checkpoint(args.out).parent.parent)
    if meta is not None and meta["method"] != "full" and not args.merge:
        raise UserError(f"{args.out} holds {meta['method']} adapters only; pass --merge to fold them into the "
                        "base weights (a separate adapter-only export is not supported)")
    print(f"wrote {export_hf(args.out, args.to, DTYPES[args.dtype])}")
    return 0
