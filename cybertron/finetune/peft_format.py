"""LoRA/DoRA adapters in PEFT's directory format: adapter_config.json + adapter_model.safetensors.

PEFT's LoRA computes what `LoRALinear` does, with the same tensors under other names:

    ours (module <fqn>)        PEFT (module model.<fqn>, lm_head as is, under base_model.model.)
    lora_A   (rank, in)        <module>.lora_A.weight
    lora_B   (out, rank)       <module>.lora_B.weight
    magnitude (out,)           <module>.lora_magnitude_vector        (DoRA: m / ||W + s B A||_row, norm detached)
    scale = alpha / rank       lora_alpha / r  (use_rslora: lora_alpha / sqrt(r))

So an adapter moves both ways by renaming. The modules adapted are read from the weight file's keys (they are
what PEFT's target_modules, layers_to_transform and exclude_modules selected). PEFT options that change the
computation in a way `LoRALinear` does not implement are refused by name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from torch import nn

from cybertron.errors import UserError
from cybertron.finetune.lora import LoRASpec, apply_lora, lora_expert_modules, lora_modules
from cybertron.models.hf import ARCHITECTURES, hf_key_to_ours, our_key_to_hf, write_safetensors

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PREFIX = "base_model.model."  # PeftModel wraps the *ForCausalLM, whose keys are ours through our_key_to_hf
# PEFT's suffix -> our parameter name; older PEFT wrote the magnitude with a `.weight` leaf
SUFFIXES = {".lora_A.weight": "lora_A", ".lora_B.weight": "lora_B", ".lora_magnitude_vector": "magnitude",
            ".lora_magnitude_vector.weight": "magnitude"}
# adapter_config.json keys whose non-default value changes the computation beyond LoRA/DoRA: refused by name
UNSUPPORTED = ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "lora_bias", "use_qalora",
               "alora_invocation_tokens", "trainable_token_indices", "target_parameters", "use_bdlora",
               "megatron_config")
TASK_TYPES = (None, "CAUSAL_LM")


def is_peft_dir(path: Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


@dataclass(frozen=True)
class PeftAdapter:
    """An adapter read from a PEFT directory: its base directory, its shape (targets are the full names of the
    adapted modules, ours) and its tensors under our names (`<fqn>.lora_A`, `<fqn>.lora_B`, `<fqn>.magnitude`)."""

    base: Path
    spec: LoRASpec
    tensors: dict[str, torch.Tensor]


# ---- writing ------------------------------------------------------------------------------------------------

def write_peft_adapter(model: nn.Module, spec: LoRASpec, base_model: str, out: Path,
                       dtype: torch.dtype = torch.float32) -> None:
    """adapter_config.json and adapter_model.safetensors for `model`'s LoRALinear layers, into directory `out`
    (which `peft.PeftModel.from_pretrained` loads onto the base `base_model`)."""
    experts = [name for name, _ in lora_expert_modules(model)]
    if experts:
        raise UserError(f"the adapters on mixture-of-experts weights ({experts[0]}) have no PEFT LoRA layout; "
                        f"export the run whole with --merge")
    adapted = [name for name, _ in lora_modules(model)]
    assert adapted, "write_peft_adapter needs a model with adapters"
    if ARCHITECTURES.get(model.config.extra.get("architecture"), {}).get("fused"):
        raise UserError(f"{model.config.extra['architecture']} fuses q/k/v into qkv_proj and gate/up into "
                        "gate_up_proj, where PEFT's adapters sit; ours are on the split projections: export the "
                        "run whole with --merge")
    tensors = {}
    for name, module in lora_modules(model):
        key = PREFIX + our_key_to_hf(name)
        tensors[f"{key}.lora_A.weight"] = module.lora_A
        tensors[f"{key}.lora_B.weight"] = module.lora_B
        if module.magnitude is not None:
            tensors[f"{key}.lora_magnitude_vector"] = module.magnitude
    tensors = {k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}
    out.mkdir(parents=True, exist_ok=True)
    write_safetensors(tensors, out / WEIGHTS_FILE)
    config = peft_config(spec, adapted, base_model)
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def peft_config(spec: LoRASpec, adapted: list[str], base_model: str) -> dict[str, Any]:
    """PEFT's LoraConfig as JSON for adapters of `spec` on the modules `adapted` (our full names)."""
    plain = all(t.replace("_", "").isalnum() for t in spec.targets)
    # A plain name means what PEFT's list entries mean (the module's last name); a glob of full names has no PEFT
    # equivalent, so the modules it selected are listed by full name (PEFT matches a full name exactly).
    targets = sorted(spec.targets) if plain else sorted(our_key_to_hf(n) for n in adapted)
    alpha = int(spec.alpha) if float(spec.alpha).is_integer() else spec.alpha
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
            "r": spec.rank, "lora_alpha": alpha, "lora_dropout": spec.dropout, "target_modules": targets,
            "use_dora": spec.dora, "use_rslora": False, "bias": "none", "fan_in_fan_out": False,
            "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "init_lora_weights": True,
            "inference_mode": True, "revision": None}


# ---- reading ------------------------------------------------------------------------------------------------

def read_peft_adapter(path: Path, resolve_base: bool = True) -> PeftAdapter:
    """A PEFT LoRA/DoRA adapter directory; UserError (one line) for what cybertron cannot load. resolve_base=False
    (serving several adapters over a base given apart) leaves `base` as written, not checked to exist."""
    path = Path(path)
    config = _read_config(path)
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        other = " (adapter_model.bin is a pickle: save it with safe_serialization=True)" \
            if (path / "adapter_model.bin").is_file() else ""
        raise UserError(f"{path} has {CONFIG_FILE} but no {WEIGHTS_FILE}{other}")
    tensors, adapted = _our_tensors(load_file(str(weights)), weights)
    dora = bool(config.get("use_dora"))
    for name in adapted:
        for leaf in ("lora_A", "lora_B") + (("magnitude",) if dora else ()):
            if f"{name}.{leaf}" not in tensors:
                raise UserError(f"{weights} has no {leaf} for module {name}; the file is incomplete")
        if not dora and f"{name}.magnitude" in tensors:
            raise UserError(f"{weights} holds DoRA magnitudes but {CONFIG_FILE} says use_dora false")
    rank, alpha = config["r"], config["lora_alpha"]
    if config.get("use_rslora"):  # rank-stabilised: scale alpha / sqrt(r), which is (alpha sqrt(r)) / r
        alpha = alpha * math.sqrt(rank)
    spec = LoRASpec(rank=rank, alpha=float(alpha), dropout=float(config.get("lora_dropout") or 0.0),
                    targets=adapted, dora=dora)
    base = _base_dir(path, config) if resolve_base else Path(config.get("base_model_name_or_path") or "")
    return PeftAdapter(base, spec, tensors)


def adapter_base(path: Path) -> Path:
    """The base directory a PEFT adapter directory names (read without its weights)."""
    return _base_dir(Path(path), _read_config(Path(path)))


def tokenizer_dir(path: Path) -> Path:
    """Where a base's tokenizer files are: the directory itself, or for a PEFT adapter saved without them (as
    `peft` saves), its base's."""
    path = Path(path)
    while is_peft_dir(path) and not (path / "tokenizer.json").is_file():
        path = adapter_base(path)
    return path


def _read_config(path: Path) -> dict[str, Any]:
    file = path / CONFIG_FILE
    try:
        config = json.loads(file.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{file} is not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise UserError(f"{file} is not a JSON object")
    if config.get("peft_type") != "LORA":
        raise UserError(f"{file} is a {config.get('peft_type')} adapter; cybertron loads LoRA and DoRA adapters")
    if config.get("task_type") not in TASK_TYPES:
        raise UserError(f"{file} is a {config['task_type']} adapter; cybertron loads CAUSAL_LM adapters")
    for key in UNSUPPORTED:
        if config.get(key):
            raise UserError(f"{file} sets {key} = {json.dumps(config[key])}, which cybertron does not implement")
    if config.get("bias", "none") != "none":
        raise UserError(f"{file} sets bias = {config['bias']!r}; cybertron loads adapters with bias 'none'")
    if config.get("fan_in_fan_out"):
        raise UserError(f"{file} sets fan_in_fan_out (Conv1D weights, GPT-2 style); cybertron's layers are Linear")
    if not isinstance(config.get("r"), int) or config["r"] < 1 or \
            not isinstance(config.get("lora_alpha"), (int, float)):
        raise UserError(f"{file} needs an integer r >= 1 and a number lora_alpha")
    return config


def _our_tensors(peft: dict[str, torch.Tensor], file: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """PEFT's keys -> ours, and the adapted modules (our full names) in file order."""
    tensors: dict[str, torch.Tensor] = {}
    adapted: list[str] = []
    for key, value in peft.items():
        suffix = next((s for s in SUFFIXES if key.endswith(s)), None)
        if not key.startswith(PREFIX) or suffix is None:
            raise UserError(f"{file} holds {key}, which is not a LoRA/DoRA weight of a linear layer "
                            f"(expected {PREFIX}<module>.lora_A.weight, .lora_B.weight, .lora_magnitude_vector)")
        module = hf_key_to_ours(key[len(PREFIX):-len(suffix)])
        if module not in adapted:
            adapted.append(module)
        tensors[f"{module}.{SUFFIXES[suffix]}"] = value
    if not adapted:
        raise UserError(f"{file} holds no adapter weights")
    return tensors, adapted


def _base_dir(path: Path, config: dict[str, Any]) -> Path:
    name = config.get("base_model_name_or_path")
    if not name:
        raise UserError(f"{path / CONFIG_FILE} names no base_model_name_or_path; set it to the base model's "
                        "directory")
    base = Path(name)
    if not base.is_dir() and not base.is_absolute() and (path / base).is_dir():
        base = path / base  # a relative path written beside the adapter
    if not base.is_dir():
        raise UserError(f"the base {name} of adapter {path} is not a local directory; set base_model_name_or_path "
                        f"in {CONFIG_FILE} to the base model's directory (cybertron reads no hub ids)")
    return base


# ---- applying -----------------------------------------------------------------------------------------------

@torch.no_grad()
def apply_peft_adapter(model: nn.Module, adapter: PeftAdapter) -> nn.Module:
    """Swap the adapter's modules of `model` (a loaded base) for LoRALinear layers holding its tensors (fp32);
    UserError when the base lacks a module or a shape differs (the adapter was made for another model)."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [name for name in adapter.spec.targets if name not in linears]
    if missing:
        raise UserError(f"the adapter names {missing[0]}, which is not a linear layer of its base {adapter.base}; "
                        "it was made for another model")
    apply_lora(model, adapter.spec)  # targets are full names: each matches its own module
    for name, module in lora_modules(model):
        for leaf in ("lora_A", "lora_B", "magnitude"):
            param = getattr(module, leaf)
            if param is None:
                continue
            value = adapter.tensors[f"{name}.{leaf}"]
            if tuple(value.shape) != tuple(param.shape):
                raise UserError(f"the adapter's {name}.{leaf} has shape {tuple(value.shape)} but the base "
                                f"{adapter.base} needs {tuple(param.shape)}; it was made for another model")
            param.copy_(value.to(param.dtype))
    return model
