"""Load a fine-tuning run directory for inference: base model + adapters, merged into a plain Transformer.

A LoRA/DoRA/QLoRA checkpoint holds adapters only (small); the base is re-read from the Hugging Face
directory recorded in the run's finetune.json. A full fine-tuning checkpoint holds every weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import CheckpointError
from cybertron.finetune.config import MethodSection
from cybertron.finetune.lora import merge_lora_, trainable_view
from cybertron.finetune.run import FINETUNE_FILE, build_finetune_model
from cybertron.models.llama import Transformer
from cybertron.train.checkpoint import load_checkpoint, read_model_config, resolve_checkpoint


def read_finetune_meta(run_dir: Path) -> dict[str, Any] | None:
    """The run's finetune.json, or None for a run that is not a fine-tuning run."""
    path = Path(run_dir) / FINETUNE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path} is not valid JSON ({err}); it records the base model of the run") from err


def method_from_meta(meta: dict[str, Any]) -> MethodSection:
    lora = meta["lora"]
    return MethodSection(method=meta["method"], rank=lora["rank"], alpha=lora["alpha"], dropout=lora["dropout"],
                         targets=",".join(lora["targets"]), nf4_block_size=meta.get("nf4_block_size", 64))


def load_finetuned_model(path: Path, device: torch.device | str = "cpu",
                         merge: bool = True) -> tuple[torch.nn.Module, TextTokenizer]:
    """(model in eval mode, tokenizer) from a run directory (newest checkpoint) or one of its checkpoints.

    merge=True folds the adapters into plain nn.Linear weights (a QLoRA base is dequantized): the result is
    an ordinary Transformer that serving and export handle like any other. merge=False keeps the adapters."""
    ckpt = resolve_checkpoint(Path(path))
    run_dir = ckpt.parent.parent
    meta = read_finetune_meta(run_dir)
    if meta is not None and meta.get("head") == "reward":
        raise CheckpointError(f"{run_dir} is a reward model (`cybertron align --method reward`): it scores text "
                              "and does not generate; use it as `cybertron align --method grpo --reward RUN_DIR`")
    device = torch.device(device)
    if meta is None or meta["method"] == "full":
        with torch.device("meta"):
            model = Transformer(read_model_config(ckpt))
        model.to_empty(device=device)
        model.tie_weights()
        load_checkpoint(ckpt, model, None)
    else:
        base = Path(meta["base_model"])
        if not base.is_dir():
            raise CheckpointError(f"the base model {base} of fine-tuning run {run_dir} is gone; its checkpoints "
                                  "hold adapters only (restore the directory or edit finetune.json)")
        model = build_finetune_model(base, method_from_meta(meta), device, seed=0)
        load_checkpoint(ckpt, trainable_view(model), None)
        if merge:
            merge_lora_(model)
    tok_path = run_dir if (run_dir / "tokenizer.json").is_file() else ckpt
    if not (tok_path / "tokenizer.json").is_file():
        raise CheckpointError(f"no tokenizer.json in run directory {run_dir}")
    return model.eval(), TextTokenizer.load(tok_path)
