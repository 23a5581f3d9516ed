"""`parallelize()` without processes: one process gets the plain model back (activation checkpointing and the
converters applied, the same numbers), and the tensor-parallel plan resolves adapter layers from the modules
themselves."""

import torch
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

from cybertron.config import ParallelSection
from cybertron.finetune.lora import LoRASpec, apply_lora
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.parallel.apply import parallelize
from cybertron.parallel.dims import ParallelDims
from cybertron.parallel.plans import llama_tp_plan
from cybertron.parallel.tensor_parallel import AdapterColwise, AdapterRowwise, present_plan, resolve_plan
from cybertron.train.trainer import LanguageModelStep

CFG = preset_config("debug", vocab_size=64)


def _loss_and_grads(model, batch):
    loss, _ = LanguageModelStep()(model, batch)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_one_process_returns_the_model_with_checkpointing_and_converters_applied():
    tokens = torch.randint(0, CFG.vocab_size, (2, 17), generator=torch.Generator().manual_seed(0))
    batch = {"inputs": tokens[:, :-1], "labels": tokens[:, 1:]}
    plain = build_model(CFG, seed=0)
    apply_lora(plain, LoRASpec(rank=2), seed=0)
    seen = []
    model = build_model(CFG, seed=0)
    par = parallelize(model, ParallelDims(), None, ParallelSection(activation_checkpoint="full"),
                      converters=[lambda m: seen.append(apply_lora(m, LoRASpec(rank=2), seed=0))])
    assert par.model is model and par.parts == [model] and par.strategy is None and len(seen[0]) == 28
    assert par.collectives.dp_size == 1
    assert model.layers["0"].forward.__wrapped__  # the block's forward is checkpointed in place
    loss, grads = _loss_and_grads(model, batch)
    ref_loss, ref_grads = _loss_and_grads(plain, batch)
    assert loss == ref_loss and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


def test_plan_gives_adapter_layers_the_adapter_form_of_their_style():
    model = build_model(CFG, seed=0)
    plan = llama_tp_plan(sequence_parallel=True, loss_parallel=True)
    assert resolve_plan(model, plan) == present_plan(model, plan)  # no adapters: the patterns as they are
    apply_lora(model, LoRASpec(rank=2, targets=["q_proj", "down_proj"]), seed=0)
    resolved = resolve_plan(model, plan)
    assert isinstance(resolved["layers.0.self_attn.q_proj"], AdapterColwise)
    assert isinstance(resolved["layers.3.mlp.down_proj"], AdapterRowwise)
    assert type(resolved["layers.*.self_attn.k_proj"]) is ColwiseParallel  # untouched Linears keep the pattern
    assert type(resolved["layers.*.self_attn.o_proj"]) is RowwiseParallel
    down = resolved["layers.3.mlp.down_proj"]  # the layouts of the Linear's style carry over
    assert down.output_layouts == plan["layers.*.mlp.down_proj"].output_layouts and not down.use_local_output


def test_plan_gives_float8_layers_torchaos_float8_styles():
    from torch.distributed.tensor.parallel import PrepareModuleInput
    from torchao.float8.float8_tensor_parallel import (
        Float8ColwiseParallel,
        Float8RowwiseParallel,
        PrepareFloat8ModuleInput,
    )

    from cybertron.train.float8 import convert_to_float8

    model = build_model(CFG, seed=0)
    convert_to_float8(model, "tensorwise")
    model.layers["1"].mlp.up_proj = torch.nn.Linear(CFG.dim, CFG.ffn_dim, bias=False)  # one Linear left plain
    plan = llama_tp_plan(sequence_parallel=True, loss_parallel=True)
    assert resolve_plan(model, plan) == present_plan(model, plan)  # without float8: the plain styles
    resolved = resolve_plan(model, plan, float8=True)
    assert type(resolved["layers.0.self_attn.q_proj"]) is Float8ColwiseParallel
    assert type(resolved["layers.2.mlp.down_proj"]) is Float8RowwiseParallel
    assert type(resolved["layers.0.self_attn"]) is PrepareFloat8ModuleInput  # q/k/v share one float8 all-gather
    assert type(resolved["layers.0.mlp"]) is PrepareFloat8ModuleInput
    # a module whose input also feeds a plain Linear prepares it in high precision; the plain Linear keeps its style
    assert type(resolved["layers.1.mlp"]) is PrepareModuleInput
    assert type(resolved["layers.1.mlp.up_proj"]) is ColwiseParallel
    assert type(resolved["lm_head"]) is ColwiseParallel  # the head stays in high precision
    q = resolved["layers.0.self_attn.q_proj"]
    o = resolved["layers.0.self_attn.o_proj"]
    assert o.output_layouts == plan["layers.*.self_attn.o_proj"].output_layouts  # the layouts carry over
    assert q.use_local_output and not o.use_local_output


def test_plan_keeps_moe_layers_whole_and_every_dense_mlp_split():
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import PrepareModuleInputOutput

    from cybertron.models.moe import MoE

    cfg = preset_config("debug", vocab_size=64, n_experts=4, top_k=2, first_k_dense=1)
    model = build_model(cfg, seed=0)
    moe = [i for i in range(cfg.n_layers) if isinstance(model.layers[str(i)].mlp, MoE)]
    plan = llama_tp_plan(sequence_parallel=True, loss_parallel=True, moe_layers=moe, n_layers=cfg.n_layers)
    assert moe == [1, 2, 3]
    for i in moe:  # the sequence-sharded stream in, replicated inside, sequence-sharded out
        style = plan[f"layers.{i}.mlp"]
        assert type(style) is PrepareModuleInputOutput and not any(k.startswith(f"layers.{i}.mlp.") for k in plan)
        assert style.prepare_module_input.input_layouts == (Shard(1),)
        assert style.prepare_module_input.desired_input_layouts == (Replicate(),)
        assert style.prepare_module_output.desired_output_layouts == (Shard(1),)
    dense = llama_tp_plan(sequence_parallel=True, loss_parallel=True)
    for suffix in ("", ".gate_proj", ".up_proj", ".down_proj"):  # layer 0 keeps the dense MLP's styles
        assert type(plan[f"layers.0.mlp{suffix}"]) is type(dense[f"layers.*.mlp{suffix}"])
    assert present_plan(model, plan) == plan  # every entry names a module of the model
