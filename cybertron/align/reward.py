"""Reward models: a decoder whose head maps the hidden state of a sequence's last token to one number,
trained on preference pairs with the Bradley-Terry loss, and used by GRPO to score rollouts.

Parameter names are those of `transformers`' LlamaForSequenceClassification (`model.*`, `score.weight`), so
the weights load there unchanged (tests/parity compares the scores).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from cybertron.align.context_parallel import SequenceSums
from cybertron.align.losses import bradley_terry_loss
from cybertron.models.llama import Transformer
from cybertron.parallel.context_parallel import ContextParallelAttention
from cybertron.train.trainer import Batch

HEAD = "reward"  # the run metadata's "head" of a reward-model run (runs.py)


class RewardModel(nn.Module):
    def __init__(self, backbone: Transformer, seed: int = 0):
        super().__init__()
        backbone.lm_head = None  # the vocabulary projection is replaced by the scalar head
        self.model = backbone
        self.config = backbone.config
        weight = backbone.embed_tokens.weight
        self.score = nn.Linear(self.config.dim, 1, bias=False, device=weight.device, dtype=weight.dtype)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            values = torch.empty(self.score.weight.shape).normal_(0.0, self.config.init_std, generator=generator)
            self.score.weight.copy_(values)

    def forward(self, tokens: torch.Tensor, positions: torch.Tensor | None = None,
                lengths: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T) fp32 score after each token; with `lengths`, (B,) the score of each right-padded row at its
        last real token (through forward, so DDP/FSDP wrappers see the call)."""
        scores = self.score(self.model(tokens, positions=positions)).squeeze(-1).float()
        if lengths is None:
            return scores
        return scores.gather(1, (lengths - 1)[:, None]).squeeze(1)

    def sequence_scores(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B,) score of each right-padded row at its last real token."""
        return self(ids, lengths=lengths)


class RewardStep:
    """Bradley-Terry: the sum over pairs of -log sigmoid(r(chosen) - r(rejected)). Under context parallelism
    (`under_context_parallel`) the scores come from the cp ranks' chunks (align/context_parallel.py)."""

    def __init__(self, sums: SequenceSums | None = None):
        self.sums = sums

    def under_context_parallel(self, attention: ContextParallelAttention) -> RewardStep:
        return RewardStep(SequenceSums(attention))

    def weight(self, batch: Batch) -> torch.Tensor:
        ids = batch["chosen_ids"]
        return torch.tensor(ids.shape[0], device=ids.device)

    def __call__(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        n = batch["chosen_ids"].shape[0]
        ids = torch.cat([batch["chosen_ids"], batch["rejected_ids"]])
        lengths = torch.cat([batch["chosen_len"], batch["rejected_len"]])
        scores = model(ids, lengths=lengths) if self.sums is None else self.sums.last_token_scores(model, ids, lengths)
        chosen, rejected = scores[:n], scores[n:]
        metrics = {"accuracy": (chosen > rejected).float().sum(), "margin": (chosen - rejected).detach().sum(),
                   "score_chosen": chosen.detach().sum(), "score_rejected": rejected.detach().sum()}
        return bradley_terry_loss(chosen, rejected).sum(), metrics


class RewardModelScorer:
    """Scores token sequences with a trained reward model, in batches, without gradients."""

    def __init__(self, model: RewardModel, batch_size: int = 16):
        self.model = model.eval()
        self.batch_size = batch_size
        self.device = next(model.parameters()).device

    @torch.no_grad()
    def __call__(self, sequences: Sequence[Sequence[int]]) -> list[float]:
        scores: list[float] = []
        for i in range(0, len(sequences), self.batch_size):
            chunk = sequences[i:i + self.batch_size]
            width = max(len(s) for s in chunk)
            ids = torch.tensor([list(s) + [0] * (width - len(s)) for s in chunk], device=self.device)
            lengths = torch.tensor([len(s) for s in chunk], device=self.device)
            scores += self.model.sequence_scores(ids, lengths).tolist()
        return scores


def save_reward_hf(model: RewardModel, out_dir: Path, pad_token_id: int | None,
                   dtype: torch.dtype | None = None, eos_token_id: int | None = None,
                   bos_token_id: int | None = None) -> Path:
    """Write a reward model (adapters already merged) as a Hugging Face `*ForSequenceClassification`
    directory with one label: our parameter names are already that class's. The scorer reads the last
    non-pad token, so pad_token_id is what it needs; bos/eos are kept for the tokenizer's users."""
    from cybertron.models.hf import config_to_hf, write_safetensors

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: (v.to(dtype) if dtype is not None else v).detach().cpu().contiguous()
               for k, v in model.state_dict().items()}
    hf = config_to_hf(model.config, str(next(iter(tensors.values())).dtype).removeprefix("torch."))
    hf["architectures"] = [hf["architectures"][0].replace("ForCausalLM", "ForSequenceClassification")]
    hf.update({"num_labels": 1, "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0},
               "problem_type": "regression", "pad_token_id": pad_token_id})
    hf.update({k: v for k, v in (("bos_token_id", bos_token_id), ("eos_token_id", eos_token_id)) if v is not None})
    write_safetensors(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(hf, indent=2))
    return out
