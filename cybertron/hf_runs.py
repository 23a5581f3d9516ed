"""A run directory <-> a Hugging Face directory: what `cybertron convert` and `cybertron export` do.

The HF directory written holds config.json, safetensors and the tokenizer files, and loads in
`transformers.AutoModelForCausalLM.from_pretrained` with the same logits as cybertron's model (a reward run:
`AutoModelForSequenceClassification`, with the same scores). An adapter run can instead be written as a PEFT
adapter directory (`export_peft`), which `peft.PeftModel.from_pretrained` loads onto the run's base.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from cybertron.align.reward import save_reward_hf
from cybertron.data.tokenizer import copy_tokenizer_files
from cybertron.errors import UserError
from cybertron.files import atomic_directory, is_empty_or_absent
from cybertron.finetune.peft_format import write_peft_adapter
from cybertron.models.hf import SpecialTokenIds, load_hf_model, save_hf_model
from cybertron.runs import REWARD_HEAD, LoadedRun, converted_meta, is_hf_dir, load_run, read_meta
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
    _refuse_non_empty(run_dir)
    if not (hf_dir / "tokenizer.json").is_file():
        raise UserError(f"{hf_dir} has no tokenizer.json; a run directory needs the model's tokenizer")
    model = load_hf_model(hf_dir)
    with atomic_directory(run_dir) as tmp:  # a kill leaves no run directory, never half of one
        copy_tokenizer_files(hf_dir, tmp)
        converted_meta(hf_dir).write(tmp)
        ckpt = ckpt_io.save_checkpoint(tmp, 0, model, None, {"converted_from": str(hf_dir.resolve())},
                                       model.config, keep=1)
    return run_dir / ckpt.relative_to(tmp)


def export_hf(run_dir: Path, hf_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A run's newest checkpoint (adapters merged into the base) as a Hugging Face directory."""
    hf_dir = Path(hf_dir)
    _refuse_non_empty(hf_dir)
    ckpt = ckpt_io.resolve_checkpoint(Path(run_dir))  # reports a fallback once; load_run gets the checkpoint
    run = load_run(ckpt, "cpu", merge=True)
    with atomic_directory(hf_dir) as tmp:  # a kill leaves no --out directory, never a half-written model
        _write_hf(run, ckpt.parent.parent, tmp, dtype)
    return hf_dir


def export_peft(run_dir: Path, out_dir: Path, dtype: torch.dtype = torch.float32) -> Path:
    """A LoRA/DoRA/QLoRA run's newest adapters as a PEFT adapter directory (adapter_config.json,
    adapter_model.safetensors, the tokenizer files) whose base_model_name_or_path is the run's base. A QLoRA
    adapter is written as is: whoever loads it quantizes the base (or not) as they choose."""
    out_dir = Path(out_dir)
    _refuse_non_empty(out_dir)
    ckpt = ckpt_io.resolve_checkpoint(Path(run_dir))
    root = ckpt.parent.parent
    meta = read_meta(root)
    if meta.adapters is None:
        raise UserError(f"{root} is a {meta.method} run with no adapters to write in PEFT's format; export "
                        "it whole with --merge")
    if meta.head == REWARD_HEAD:
        raise UserError(f"{root} is a reward model, whose score head PEFT's causal-LM adapter cannot hold; "
                        "export it whole with --merge")
    run = load_run(ckpt, "cpu", merge=False)
    with atomic_directory(out_dir) as tmp:  # a kill leaves no --out directory, never half an adapter
        copy_tokenizer_files(root, tmp)
        write_peft_adapter(run.model, meta.adapters.lora, str(meta.base_model), tmp, dtype)
        if not (tmp / "tokenizer.json").is_file():
            run.tokenizer.save(tmp)
    return out_dir


def base_is_hf(run_dir: Path) -> bool:
    """Whether the run's base is a Hugging Face directory (one `peft` can load the adapter onto)."""
    base = read_meta(ckpt_io.resolve_checkpoint(Path(run_dir), report=None).parent.parent).base_model
    return base is not None and is_hf_dir(Path(base))


def _write_hf(run: LoadedRun, root: Path, out: Path, dtype: torch.dtype) -> None:
    tokenizer = run.tokenizer
    copy_tokenizer_files(root, out)  # first: save_hf_model extends the base's generation_config.json
    if run.meta.head == REWARD_HEAD:  # a reward model: a *ForSequenceClassification directory
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
        save_reward_hf(run.model, out, pad, dtype, eos_token_id=tokenizer.eos_id, bos_token_id=tokenizer.bos_id)
    else:
        generation = out / "generation_config.json"
        save_hf_model(run.model.state_dict(), run.model.config, out, dtype=dtype,
                      special_ids=SpecialTokenIds(tokenizer.eos_id, tokenizer.bos_id, tokenizer.pad_id),
                      generation_defaults=json.loads(generation.read_text()) if generation.is_file() else None)
    if not (out / "tokenizer.json").is_file():
        tokenizer.save(out)


def _refuse_non_empty(out: Path) -> None:
    """--out is written whole by a rename: it must be new, or an empty directory."""
    if not is_empty_or_absent(out):
        what = "is not a directory" if not out.is_dir() else "exists and is not empty"
        raise UserError(f"--out {out} {what}; choose a new directory")
