"""A run directory <-> a Hugging Face directory: what `cybertron convert` and `cybertron export` do.

The HF directory written holds config.json, safetensors and the tokenizer files, and loads in
`transformers.AutoModelForCausalLM.from_pretrained` with the same logits as cybertron's model (a reward run:
`AutoModelForSequenceClassification`, with the same scores).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cybertron.align.reward import save_reward_hf
from cybertron.data.tokenizer import copy_tokenizer_files
from cybertron.errors import UserError
from cybertron.models.hf import SpecialTokenIds, load_hf_model, save_hf_model
from cybertron.runs import REWARD_HEAD, converted_meta, load_run
from cybertron.train import checkpoint as ckpt_io

EXPORT_DTYPES = ("fp32", "bf16", "fp16")  # the canonical names (cybertron.config) of the dtypes written


def convert_from_hf(hf_dir: Path, run_dir: Path) -> Path:
    """Write `hf_dir`'s weights as checkpoint step-0 of a new run directory, with its tokenizer files;
    returns the checkpoint. `cybertron generate --model RUN_DIR` and `train --model.init_from` both work."""
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not hf_dir.is_dir():
        raise UserError(f"--from-hf {hf_dir} is not a directory; give a Hugging Face model directory")
    if ckpt_io.latest_checkpoint(run_dir) is not None:
        raise UserError(f"{run_dir} already holds checkpoints; choose another --out")
    if not (hf_dir / "tokenizer.json").is_file():
        raise UserError(f"{hf_dir} has no tokenizer.json; a run directory needs the model's tokenizer")
    model = load_hf_model(hf_dir)
    copy_tokenizer_files(hf_dir, run_dir)
    converted_meta(hf_dir).write(run_dir)
    return ckpt_io.save_checkpoint(run_dir, 0, model, None, {"converted_from": str(hf_dir.resolve())},
                                   model.config, keep=1)


def export_hf(run_dir: Path, hf_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A run's newest checkpoint (adapters merged into the base) as a Hugging Face directory."""
    hf_dir = Path(hf_dir)
    if hf_dir.exists() and any(hf_dir.iterdir()):
        raise UserError(f"--out {hf_dir} exists and is not empty; choose a new directory")
    ckpt = ckpt_io.resolve_checkpoint(Path(run_dir))  # reports a fallback once; load_run gets the checkpoint
    copy_tokenizer_files(ckpt.parent.parent, hf_dir)  # first: save_hf_model extends the base's generation_config
    run = load_run(ckpt, "cpu", merge=True)
    tokenizer = run.tokenizer
    if run.meta.head == REWARD_HEAD:  # a reward model: a *ForSequenceClassification directory
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        save_reward_hf(run.model, hf_dir, pad, dtype)
    else:
        generation = hf_dir / "generation_config.json"
        save_hf_model(run.model.state_dict(), run.model.config, hf_dir, dtype=dtype,
                      special_ids=SpecialTokenIds(tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id),
                      generation_defaults=json.loads(generation.read_text()) if generation.is_file() else None)
    if not (hf_dir / "tokenizer.json").is_file():
        tokenizer.save(hf_dir)
    return hf_dir
