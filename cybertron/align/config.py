"""`cybertron align` configuration: the base model, the data, the alignment method and its coefficients, the
weights that train (LoRA family or full, as in `cybertron finetune`), and the shared training sections."""

from __future__ import annotations

from dataclasses import dataclass, field

from cybertron.config import (
    TRAINING_SHORTCUTS,
    CheckpointSection,
    EpochTrainSection,
    EvalSection,
    LogSection,
    ParallelSection,
    RunSection,
    opt,
    raise_first_failure,
    validate_shared_sections,
)
from cybertron.data.escapes import decode_escapes
from cybertron.data.mixture import parse_mix
from cybertron.finetune.config import (
    CHAT_TEMPLATE_HELP,
    BaseModelSection,
    MethodSection,
    base_model_checks,
    method_checks,
    validate_layout,
)

PREFERENCE_METHODS = ("dpo", "ipo", "simpo", "orpo")
ONLINE_METHODS = ("grpo", "rloo", "reinforce++", "ppo")  # generation in the loop: GRPO's rollouts and task
METHODS = (*PREFERENCE_METHODS, "reward", *ONLINE_METHODS, "kto", "online_dpo")
ON_POLICY = (*ONLINE_METHODS, "online_dpo")  # online_dpo samples through GRPO's rollouts too (its own task)
# The methods that read a data.mix (align/mix.py): the preference family's pairs and the online methods' prompts.
MIX_METHODS = ("dpo", "ipo", "simpo", "orpo", "reward", "grpo", "rloo", "reinforce++", "ppo")


@dataclass
class AlignDataSection:
    path: str = opt("", "dpo/ipo/simpo/orpo/reward: .jsonl of {'prompt', 'chosen', 'rejected'} (plain text, or "
                        "chat messages rendered by the model's template); grpo/online_dpo: .jsonl of "
                        "{'prompt', ...} whose other fields are passed to the reward function; kto: .jsonl "
                        "of {'prompt', 'completion', 'label': true/false} or {'messages', 'label'}")
    split: str = opt("train", "Hugging Face data sets: the split to read")
    subset: str = opt("", "Hugging Face Hub data sets: the configuration (load_dataset's name)")
    streaming: bool = opt(False, "Hugging Face data sets: read record by record (an IterableDataset)")
    mix: list[dict] = opt([], "a weighted mixture instead of data.path (pairs or prompts): "
                              "[[data.mix]] tables with path and weight (default 1); on the command line "
                              "--data.mix path=FILE,weight=0.7 once per source")
    seq_len: int = opt(0, "most tokens of prompt + response; longer responses are cut (prompts keep their "
                          "end); 0 = the model's maximum, at most 1024")
    val_fraction: float = opt(0.05, "fraction of records held out for evaluation (none if it rounds to 0)")
    chat_template: str = opt("", "renders chat-message records: " + CHAT_TEMPLATE_HELP)


@dataclass
class AlignSection:
    method: str = opt("dpo", "dpo, ipo, simpo, orpo (preference pairs), reward (a Bradley-Terry reward model), "
                             "or with generation in the loop: grpo (group-normalised advantages), rloo "
                             "(leave-one-out baseline), reinforce++ (globally normalised KL-shaped returns) or ppo "
                             "(a value head and GAE); the grpo keys below apply to all four; kto (unpaired "
                             "desirable/undesirable completions) or online_dpo (DPO on pairs sampled from the "
                             "current policy and judged by align.reward)")
    beta: float = opt(0.1, "dpo/ipo/kto/online_dpo: strength of the pull towards the reference")
    label_smoothing: float = opt(0.0, "dpo: assumed share of flipped preference labels (conservative DPO)")
    simpo_beta: float = opt(2.0, "simpo: reward scale of the length-normalised log-probability")
    simpo_gamma: float = opt(0.5, "simpo: target reward margin")
    orpo_lambda: float = opt(0.1, "orpo: weight of the odds-ratio term next to the chosen NLL")
    reward: str = opt("", "grpo/online_dpo: FILE.py:FUNCTION called as f(prompts, completions, **fields) -> list of "
                          "numbers, or a run directory of `cybertron align --method reward`")
    group_size: int = opt(8, "grpo: completions sampled per prompt (advantages are relative within a group); "
                             "train.global_batch_size and train.micro_batch_size count prompts")
    max_new_tokens: int = opt(128, "grpo: most tokens per completion")
    stop: str = opt("", "grpo: a string that ends a completion besides the end-of-text token (e.g. \"\\n\" in "
                        "TOML; backslash escapes such as \\n work on the command line too)")
    temperature: float = opt(1.0, "grpo: sampling temperature of the rollouts")
    top_p: float = opt(1.0, "grpo: nucleus sampling of the rollouts (1 = off)")
    kl_coef: float = opt(0.04, "grpo: weight of the KL penalty to the reference (0 = no reference is kept)")
    clip_eps: float = opt(0.2, "grpo: PPO clipping range of the probability ratio")
    updates_per_rollout: int = opt(1, "grpo: optimizer steps taken on each batch of rollouts")
    loss_type: str = opt("token", "grpo: token (every completion token weighs the same, as DAPO) or sequence "
                                  "(each completion's mean, as the GRPO paper)")
    scale_rewards: bool = opt(True, "grpo: divide advantages by the group's reward std (Dr. GRPO: false)")
    gamma: float = opt(1.0, "reinforce++/ppo: discount of the token rewards")
    gae_lambda: float = opt(0.95, "ppo: GAE lambda (0 = one-step TD, 1 = Monte-Carlo returns minus the value)")
    vf_coef: float = opt(0.1, "ppo: weight of the value loss next to the policy loss")
    value_clip: float = opt(0.2, "ppo: clipping range of the value change from the rollout's values")
    check_logprobs: bool = opt(False, "grpo debug: assert at every step that the generator's token "
                                      "log-probabilities equal the trainer's (needs fp32 and no dropout)")
    # ---- multi-turn environments (align/multiturn.py, align/environments/) ----
    environment: str = opt("", "grpo/rloo: multi-turn rollouts with an environment class, MODULE:CLASS or "
                               "FILE.py:CLASS (e.g. cybertron.align.environments.calculator:Calculator); it gives "
                               "the reward, so align.reward stays empty")
    max_turns: int = opt(4, "grpo/rloo with align.environment: most assistant turns per episode")
    logprob_tolerance: float = opt(1e-5, "grpo debug: largest allowed |generator - trainer| log-probability "
                                         "(online_dpo: times max(1, |log p|))")
    # ---- kto and online_dpo (align/kto.py, align/online_dpo.py); online_dpo also reads align.reward,
    # max_new_tokens, stop, temperature, top_p, check_logprobs and logprob_tolerance as grpo does
    desirable_weight: float = opt(1.0, "kto: lambda_D, weight of desirable completions' losses")
    undesirable_weight: float = opt(1.0, "kto: lambda_U, weight of undesirable completions' losses")
    online_loss: str = opt("dpo", "online_dpo: the pair loss, dpo or ipo")


@dataclass
class AlignConfig:
    model: BaseModelSection = field(default_factory=BaseModelSection)
    data: AlignDataSection = field(default_factory=AlignDataSection)
    align: AlignSection = field(default_factory=AlignSection)
    finetune: MethodSection = field(default_factory=MethodSection)
    train: EpochTrainSection = field(default_factory=lambda: EpochTrainSection(
        steps=0, global_batch_size=8, lr=5e-5, weight_decay=0.0, min_lr_ratio=0.0))
    eval: EvalSection = field(default_factory=lambda: EvalSection(every=50, batches=4, batch_size=8))
    checkpoint: CheckpointSection = field(default_factory=lambda: CheckpointSection(every=100, keep=2))
    log: LogSection = field(default_factory=LogSection)
    run: RunSection = field(default_factory=RunSection)
    parallel: ParallelSection = field(default_factory=lambda: ParallelSection(data_parallel="ddp"))


# The flags of the common case: `cybertron align --method dpo --model DIR --data FILE`.
SHORTCUTS = {**TRAINING_SHORTCUTS, "--model": "model.path", "--data": "data.path", "--method": "align.method",
             "--weights": "finetune.method", "--reward": "align.reward", "--beta": "align.beta",
             "--lr": "train.lr", "--epochs": "train.epochs"}


def validate(cfg: AlignConfig, world_size: int = 1) -> None:
    """Reject impossible values before any work (or any process group) starts; each message names the key."""
    a, d, f, t = cfg.align, cfg.data, cfg.finetune, cfg.train
    grpo = a.method in ON_POLICY  # every online method (online_dpo too) shares GRPO's rollouts and checks
    raise_first_failure([
        (bool(cfg.model.path), "model.path (--model) is required: a Hugging Face model directory or a run "
                               "directory"),
        (bool(d.path or d.mix), "data.path (--data) is required: a .jsonl of preference pairs (or prompts for "
                                "the online methods), or data.mix"),
        (not (d.path and d.mix), f"give data.path ({d.path}) or data.mix, not both"),
        (a.method in METHODS, f"align.method must be one of {', '.join(METHODS)}, got {a.method!r}"),
        (not d.mix or a.method in MIX_METHODS, f"data.mix is not supported by align.method={a.method} yet "
                                               f"(only {', '.join(MIX_METHODS)}); give data.path"),
        *method_checks(f, " (--weights)"),
        *base_model_checks(cfg.model, f.method),
        (a.beta > 0, f"align.beta must be > 0, got {a.beta}"),
        (0 <= a.label_smoothing < 0.5, f"align.label_smoothing must be in [0, 0.5), got {a.label_smoothing}"),
        (a.simpo_beta > 0, f"align.simpo_beta must be > 0, got {a.simpo_beta}"),
        (a.orpo_lambda >= 0, f"align.orpo_lambda must be >= 0, got {a.orpo_lambda}"),
        (not grpo or bool(a.reward) or bool(a.environment), f"align.reward (--reward) is required for {a.method}: "
                                     "FILE.py:FUNCTION or a reward-model run directory"),
        (0 < a.gamma <= 1, f"align.gamma must be in (0, 1], got {a.gamma}"),
        (0 <= a.gae_lambda <= 1, f"align.gae_lambda must be in [0, 1], got {a.gae_lambda}"),
        (a.vf_coef > 0, f"align.vf_coef must be > 0 (the value head learns from it), got {a.vf_coef}"),
        (a.value_clip > 0, f"align.value_clip must be > 0, got {a.value_clip}"),
        # ---- multi-turn environments ----
        (not a.environment or a.method in ("grpo", "rloo"),
         f"align.environment runs with grpo or rloo (one advantage per episode), not {a.method}: its per-token "
         "returns would stop at the tokens the environment inserts between turns"),
        (not (a.environment and a.reward), "align.environment gives the reward: leave align.reward empty"),
        (a.max_turns >= 1, f"align.max_turns must be >= 1, got {a.max_turns}"),
        (a.desirable_weight > 0 and a.undesirable_weight > 0, f"align.desirable_weight and "
         f"align.undesirable_weight must be > 0, got {a.desirable_weight} and {a.undesirable_weight}"),
        (a.online_loss in ("dpo", "ipo"), f"align.online_loss must be dpo or ipo, got {a.online_loss!r}"),
        (not (a.method == "kto" and cfg.parallel.cp > 1), f"parallel.cp={cfg.parallel.cp} does not run with kto "
                                                          "yet; use parallel.cp=1"),
        (a.group_size >= 2, f"align.group_size must be >= 2 (advantages compare completions of a prompt), "
                            f"got {a.group_size}"),
        (a.max_new_tokens >= 1, f"align.max_new_tokens must be >= 1, got {a.max_new_tokens}"),
        (a.temperature > 0, f"align.temperature must be > 0 (rollouts must sample), got {a.temperature}"),
        (0 < a.top_p <= 1, f"align.top_p must be in (0, 1], got {a.top_p}"),
        (a.kl_coef >= 0, f"align.kl_coef must be >= 0, got {a.kl_coef}"),
        (a.clip_eps > 0, f"align.clip_eps must be > 0, got {a.clip_eps}"),
        (a.updates_per_rollout >= 1, f"align.updates_per_rollout must be >= 1, got {a.updates_per_rollout}"),
        (a.loss_type in ("token", "sequence"), f"align.loss_type must be token or sequence, got {a.loss_type!r}"),
        (a.logprob_tolerance > 0, f"align.logprob_tolerance must be > 0, got {a.logprob_tolerance}"),
        (not (grpo and a.check_logprobs and f.dropout > 0 and f.method != "full"),
         "align.check_logprobs needs finetune.dropout=0: adapter dropout changes the trainer's log-probabilities"),
        (not (grpo and a.check_logprobs and t.dtype in ("bf16", "fp16")),
         "align.check_logprobs compares fp32 log-probabilities: set train.dtype=fp32"),
        (not grpo or cfg.checkpoint.every % a.updates_per_rollout == 0,
         f"checkpoint.every ({cfg.checkpoint.every}) must be a multiple of align.updates_per_rollout "
         f"({a.updates_per_rollout}) so a resumed run starts at a fresh rollout"),
        (d.seq_len == 0 or d.seq_len >= 2, f"data.seq_len must be >= 2 (or 0 = auto), got {d.seq_len}"),
        (0 <= d.val_fraction < 1, f"data.val_fraction must be in [0, 1), got {d.val_fraction}"),
        (t.fp8 == "none", "train.fp8 is not supported by `cybertron align` yet"),
        (not (grpo and cfg.parallel.cp > 1), f"parallel.cp={cfg.parallel.cp} does not run with {a.method}: its "
                                             "rollouts generate token by token from a KV cache that context "
                                             "parallelism does not split over ranks; use parallel.cp=1"),
        (not t.fused_loss, "train.fused_loss does not apply to `cybertron align` (its losses need per-token "
                           "log-probabilities)"),
    ])
    parse_mix(d.mix)
    decode_escapes(a.stop, "align.stop")  # an incomplete escape fails now, not at the first rollout
    validate_shared_sections(cfg)
    validate_layout(cfg, world_size)
    p = cfg.parallel
    raise_first_failure([
        (not (grpo and p.data_parallel not in ("ddp", "zero3") and world_size > 1),
         f"{a.method} runs on several processes with parallel.data_parallel=ddp (whole weights on every rank) or "
         f"zero3 (generation gathers the sharded weights block by block), got {p.data_parallel}"),
        (not (a.method == "ppo" and p.tp > 1),
         "ppo's value head reads whole hidden states, which tensor parallelism splits: use parallel.tp=1"),
        (not (a.environment and world_size > 1 and p.data_parallel == "zero3"),
         "align.environment runs on several processes with parallel.data_parallel=ddp only (multi-turn "
         "rollouts do not run the engines of sharded weights in lockstep)"),
        (not (grpo and p.tp > 1 and (p.sequence_parallel or p.loss_parallel)),
         f"{a.method} with parallel.tp > 1 samples from whole logits of whole sequences: set "
         "parallel.sequence_parallel=false and parallel.loss_parallel=false"),
        (p.pp == 1, f"`cybertron align` splits no pipeline stages (a pair's loss needs the whole model's "
                    f"output for both responses): use data or tensor parallelism, got parallel.pp={p.pp}"),
    ])
