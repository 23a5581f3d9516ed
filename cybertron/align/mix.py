"""An alignment run's records from data.path or a weighted data.mix (the preference methods and GRPO).

Under data.mix each source is read and split into train and validation on its own; the train rows (pairs,
or prompt indices for GRPO) of all sources lie one source after another, and the run's RowMixtureLoader
draws them by weight (data/sft.py), while validation covers every source's held-out records.
"""

from __future__ import annotations

from cybertron.align.config import AlignDataSection
from cybertron.align.preference_data import PreferenceData, PromptRecord, build_preference_data, read_prompts, split
from cybertron.data.hf import HFOptions
from cybertron.data.mixture import Mixture, concat_rows, parse_mix
from cybertron.data.tokenizer import TextTokenizer


def hf_options(d: AlignDataSection) -> HFOptions:
    return HFOptions(d.split, d.subset, d.streaming)


def preference_data(d: AlignDataSection, tokenizer: TextTokenizer, max_len: int,
                    seed: int) -> tuple[PreferenceData, Mixture | None]:
    """Padded pair rows of data.path, or of every data.mix source (rows of different widths are right-padded
    with zeros: a zero mask scores nothing, and each batch is cut to its own longest pair anyway)."""
    if not d.mix:
        return build_preference_data(d.path, tokenizer, max_len, d.val_fraction, seed, hf_options(d)), None
    entries = parse_mix(d.mix)
    parts = [build_preference_data(e.path, tokenizer, max_len, d.val_fraction, seed, hf_options(d))
             for e in entries]
    vals = [p.val for p in parts if p.val is not None]
    mixture = Mixture(tuple(p.train["chosen_ids"].shape[0] for p in parts), tuple(e.weight for e in entries),
                      tuple(e.path for e in entries))
    data = PreferenceData(concat_rows([p.train for p in parts]), concat_rows(vals) if vals else None,
                          sum(p.n_pairs for p in parts), sum(p.n_truncated for p in parts),
                          [s for p in parts for s in p.sources])
    return data, mixture


def prompt_data(d: AlignDataSection, tokenizer: TextTokenizer, max_prompt_len: int, seed: int
                ) -> tuple[list[PromptRecord], list[PromptRecord], int, int, Mixture | None]:
    """GRPO prompts: (train, val, prompts read, prompts skipped as too long, the mixture or None)."""
    entries = parse_mix(d.mix) if d.mix else []
    paths = [e.path for e in entries] or [d.path]
    train, val, n_read, skipped, sizes = [], [], 0, 0, []
    for path in paths:
        prompts, n_skipped = read_prompts(path, tokenizer, max_prompt_len, hf_options(d))
        mine, held_out = split(prompts, d.val_fraction, seed)
        train += mine
        val += held_out
        n_read, skipped = n_read + len(prompts), skipped + n_skipped
        sizes.append(len(mine))
    mixture = Mixture(tuple(sizes), tuple(e.weight for e in entries), tuple(paths)) if entries else None
    return train, val, n_read, skipped, mixture
