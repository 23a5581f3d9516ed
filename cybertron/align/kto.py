"""KTO (Ethayarajh et al. 2024, "Model Alignment as Prospect Theoretic Optimization") on unpaired data.

Each record is one completion labelled desirable or undesirable (TRL's KTO format):
  {"prompt": "...", "completion": "...", "label": true}                                   (plain text)
  {"prompt": [chat messages], "completion": [assistant messages], "label": false}         (chat)
  {"messages": [chat messages ending in the assistant's reply], "label": true}            (OpenAI chat)

The loss (losses.kto_loss) compares each completion's policy/reference log-ratio with a reference point
z_ref, an estimate of KL(policy || reference) from mismatched pairs: as TRL does, the completion of record
i-1 after the prompt of record i (fixed when the data is read, after the train/val split). z_ref is the mean
policy - reference log-ratio of the mismatched pairs of the step's whole global batch, clamped at 0 and
detached: the policy's side comes from a no-grad forward at the start of each step (the weights the step
differentiates), the reference's once before training. Under data parallelism each rank forwards its share
and the sums are all-reduced, so z_ref is the same on every rank and equals one process's value (TRL instead
estimates it per micro-batch and averages the ranks' estimates: the same quantity, with more noise and
dependent on the micro-batch size).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cybertron.align import losses
from cybertron.align.dpo import evaluate_metrics, response_logprobs
from cybertron.align.preference_data import (
    TokenizedSequence,
    _messages,
    _prompt,
    _response,
    pad_sequences,
    read_jsonl,
    split,
    tokenize_sequence,
    trim_batch,
    truncate,
)
from cybertron.align.task import AlignTask, split_rows
from cybertron.data.chat_template import Message
from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import DataError
from cybertron.finetune.lora import adapters_disabled
from cybertron.parallel.world import World
from cybertron.train.trainer import Batch, Trainer, to_device


@dataclass
class KTORecord:
    prompt: str | list[Message]
    completion: str | list[Message]
    desirable: bool
    source: str  # "file:line"


def _split_messages(record: dict[str, Any], where: str) -> tuple[list[Message], list[Message]]:
    """An OpenAI-chat record: (the turns before the trailing assistant replies, those replies)."""
    messages = _messages(record["messages"], where, "messages")
    end = len(messages)
    while end > 0 and messages[end - 1]["role"] == "assistant":
        end -= 1
    if end == len(messages) or end == 0:
        raise DataError(f"{where}: 'messages' must end with the assistant's reply after at least one other turn")
    return messages[:end], messages[end:]


def parse_kto_record(record: dict[str, Any], where: str) -> KTORecord:
    label = record.get("label")
    if not isinstance(label, bool):
        shown = "missing 'label'" if label is None else f"'label' is {label!r}"[:80]
        raise DataError(f"{where}: {shown}; a KTO record needs \"label\": true (desirable completion) or false "
                        "(undesirable)")
    if "messages" in record and "prompt" not in record:
        prompt, completion = _split_messages(record, where)
        return KTORecord(prompt, completion, label, where)
    prompt = _prompt(record, where)
    if "completion" not in record:
        raise DataError(f"{where}: missing 'completion'; a KTO record has 'prompt', 'completion' and 'label' (or "
                        f"'messages' and 'label'); keys are {sorted(record)}")
    return KTORecord(prompt, _response(record, "completion", isinstance(prompt, list), where), label, where)


def read_kto_records(path: str | Path) -> list[KTORecord]:
    records = [parse_kto_record(record, where) for where, record in read_jsonl(path, "KTO data")]
    if not records:
        raise DataError(f"KTO data file {path} holds no records")
    chat = isinstance(records[0].prompt, list)
    for r in records:
        if isinstance(r.prompt, list) != chat:
            raise DataError(f"{r.source}: mixes chat messages and plain text with {records[0].source}; mismatched "
                            "prompt/completion pairs (the KL estimate) need one kind throughout")
    return records


def _tokenize(tokenizer: TextTokenizer, prompt: str | list[Message], completion: str | list[Message], max_len: int,
              where: str) -> tuple[TokenizedSequence, bool]:
    try:
        full = tokenize_sequence(tokenizer, prompt, completion)
    except DataError as err:
        raise type(err)(f"{where}: {err}") from err
    cut = truncate(full, max_len)
    if not any(cut.mask):
        raise DataError(f"{where}: no completion token fits in data.seq_len={max_len}; raise it or shorten the "
                        "prompt")
    return cut, len(cut) != len(full)


def kto_rows(records: list[KTORecord], tokenizer: TextTokenizer, max_len: int) -> tuple[Batch, int]:
    """(rows, number cut to max_len): seq_* (each record), kl_* (prompt i with completion i-1) and desirable."""
    seqs, kls, cut = [], [], 0
    for i, r in enumerate(records):
        seq, was_cut = _tokenize(tokenizer, r.prompt, r.completion, max_len, r.source)
        kl, _ = _tokenize(tokenizer, r.prompt, records[i - 1].completion, max_len, r.source)
        seqs.append(seq)
        kls.append(kl)
        cut += was_cut
    pad_id = tokenizer.pad_id if tokenizer.pad_id is not None else tokenizer.eos_id
    width = max(len(s) for s in seqs + kls)
    rows = {**pad_sequences(seqs, pad_id, "seq", width), **pad_sequences(kls, pad_id, "kl", width),
            "desirable": torch.tensor([r.desirable for r in records])}
    return rows, cut


class KTOStep:
    """Sum over completions of the KTO loss; the batch carries the reference log-probabilities (`ref_seq`) and
    the step's reference point `kl_z` (a scalar, the same in every micro-batch of the step)."""

    needs_reference = True

    def __init__(self, beta: float = 0.1, desirable_weight: float = 1.0, undesirable_weight: float = 1.0):
        self.beta, self.desirable_weight, self.undesirable_weight = beta, desirable_weight, undesirable_weight

    def weight(self, batch: Batch) -> torch.Tensor:
        ids = batch["seq_ids"]
        return torch.tensor(ids.shape[0], device=ids.device)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logp, _ = response_logprobs(model, batch["seq_ids"], batch["seq_mask"])
        desirable, z = batch["desirable"], batch["kl_z"]
        per, rewards = losses.kto_loss(logp, batch["ref_seq"], desirable, z, self.beta, self.desirable_weight,
                                       self.undesirable_weight)
        sign = desirable.float() * 2 - 1
        n = torch.tensor(float(logp.shape[0]), device=logp.device)
        metrics = {"kl": z * n,  # a mean over completions of the step's z_ref: z_ref itself
                   # +r for desirable, -r for undesirable completions: rises as the policy learns the labels
                   "reward_signed": (sign * rewards).sum(),
                   # completions whose implied reward beta (r - z_ref) has the sign of their label
                   "label_accuracy": ((rewards - self.beta * z) * sign > 0).float().sum(),
                   "logp": logp.detach().sum()}
        return per.sum(), metrics


def kto_batches(rows: Batch, batch_size: int, multiple: int = 1) -> list[Batch]:
    n = rows["seq_ids"].shape[0]
    return [trim_batch({k: v[i:i + batch_size] for k, v in rows.items()}, multiple) for i in range(0, n, batch_size)]


@torch.no_grad()
def kto_reference(world: World, model: nn.Module, rows: Batch, micro: int, device: torch.device,
                  amp: Callable[[], contextlib.AbstractContextManager]) -> Batch:
    """`rows` plus the reference's summed log-probabilities of every completion (`ref_seq`) and mismatched pair
    (`ref_kl`): the model as loaded, adapters disabled, in eval mode; each rank computes a share and gathers
    the rest (called before the layout is applied, so no rank waits on another)."""
    n = rows["seq_ids"].shape[0]
    mine = world.row_share(n)
    out = {"ref_seq": [torch.zeros(0)], "ref_kl": [torch.zeros(0)]}
    was_training = model.training
    model.eval()
    with adapters_disabled(model):
        for batch in kto_batches({k: v[mine] for k, v in rows.items()}, micro) if mine.start < mine.stop else []:
            batch = to_device(batch, device)
            with amp():
                for side in ("seq", "kl"):
                    out[f"ref_{side}"].append(response_logprobs(model, batch[f"{side}_ids"],
                                                                batch[f"{side}_mask"])[0].cpu())
    model.train(was_training)
    return {**rows, **{k: world.gather_rows(torch.cat(v), n) for k, v in out.items()}}


@torch.no_grad()
def attach_reference_point(trainer: Trainer, world: World, batches: list[Batch], over_dp: bool) -> torch.Tensor:
    """Set `kl_z` in every batch: z_ref over the mismatched pairs of all `batches` (and of every data-parallel
    rank's batches when `over_dp`), from a no-grad forward of the policy as it is now, in eval mode."""
    model = trainer.model
    was_training = model.training
    model.eval()
    sums = torch.zeros(3, dtype=torch.float64, device=world.device)
    for batch in batches:
        with trainer.comm.step_context(), trainer.autocast():
            logp, _ = response_logprobs(model, batch["kl_ids"], batch["kl_mask"])
        sums += torch.stack([logp.double().sum(), batch["ref_kl"].double().sum(),
                             torch.tensor(float(logp.shape[0]), device=logp.device, dtype=torch.float64)])
    model.train(was_training)
    if over_dp:
        sums = world.sum_over_dp(sums)
    z = losses.kto_reference_point(sums[0], sums[1], sums[2]).float()
    for batch in batches:
        batch["kl_z"] = z
    return z


@dataclass
class KTOSetup:
    step: KTOStep
    train: Batch
    val: Batch | None
    description: str
    mixture: None = None  # data.mix is not read by kto (config.MIX_METHODS)


def kto_setup(cfg: Any, tokenizer: TextTokenizer, seq_len: int) -> KTOSetup:
    a = cfg.align
    records = read_kto_records(cfg.data.path)
    train, val = split(records, cfg.data.val_fraction, cfg.train.seed)
    if len(train) < 2 or len(val) == 1:
        raise DataError(f"KTO needs at least 2 records per split for its mismatched pairs: {cfg.data.path} gives "
                        f"{len(train)} train / {len(val)} val (data.val_fraction={cfg.data.val_fraction})")
    train_rows, cut = kto_rows(train, tokenizer, seq_len)
    val_rows, val_cut = kto_rows(val, tokenizer, seq_len) if val else (None, 0)
    n_d = sum(r.desirable for r in train)
    n_u = len(train) - n_d
    description = (f"{len(records)} KTO records ({cut + val_cut} cut to seq_len {seq_len}): {len(train)} train "
                   f"({n_d} desirable, {n_u} undesirable; lambda_D n_D / lambda_U n_U = "
                   f"{a.desirable_weight * n_d / max(a.undesirable_weight * n_u, 1e-9):.3g}, the paper suggests "
                   f"1 to 4/3) / {len(val)} val")
    return KTOSetup(KTOStep(a.beta, a.desirable_weight, a.undesirable_weight), train_rows, val_rows, description)


@dataclass
class KTOTask(AlignTask):
    """KTO on labelled completions (session.Task)."""

    setup: KTOSetup

    def describe(self) -> str:
        return self.describe_with(self.plan.describe("completions"))

    @property
    def seq_multiple(self) -> int:
        tp = self.world.dims.tp
        return tp if tp > 1 and self.cfg.parallel.sequence_parallel else 1

    def next_micro_batches(self, step: int) -> list[Batch]:
        rows = self.loader.next_batch()
        mine = self.world.local_slice(self.loader.batch_size)
        batches = split_rows({k: v[mine] for k, v in rows.items()}, self.cfg.train.micro_batch_size, self.device,
                             partial(kto_batches, multiple=self.seq_multiple))
        attach_reference_point(self.trainer, self.world, batches, over_dp=True)
        return batches

    def tokens_in(self, micro_batches: list[Batch]) -> int:
        return sum(int(b["seq_len"].sum() + b["kl_len"].sum()) for b in micro_batches)

    def evaluate(self, step: int) -> dict[str, float] | None:
        if self.setup.val is None:
            return None
        e = self.cfg.eval
        batches = [to_device(b, self.device) for b in kto_batches(self.setup.val, e.batch_size,
                                                                  self.seq_multiple)[:e.batches]]
        attach_reference_point(self.trainer, self.world, batches, over_dp=False)  # every rank has them all
        return {f"val_{k}": v for k, v in evaluate_metrics(self.trainer, batches).items()}

    def summary(self, evaluation: dict[str, float] | None) -> str:
        if evaluation is None:
            return ""
        return (f"held-out loss {evaluation['val_loss']:.4f}, label accuracy "
                f"{evaluation['val_label_accuracy']:.3f}; ")
