"""cybertron's model as an lm-evaluation-harness model (lm_eval's `TemplateLM`): loglikelihood requests are
scored by scoring.py, rolling log-likelihoods use lm_eval's own windows (as its Hugging Face model does), and
generate_until runs through cybertron's serving engine with the task's stop sequences.

Importing this module imports lm_eval (the optional `[eval]` extra): tasks.py imports it only when tasks run."""

from __future__ import annotations

from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from cybertron.data.tokenizer import TextTokenizer
from cybertron.eval.scoring import score_continuations
from cybertron.models.llama import Transformer
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams

DEFAULT_MAX_GEN_TOKS = 256  # lm_eval's default when a task names no max_gen_toks
BLOCK_SIZE = 16


class CybertronLM(TemplateLM):
    """`CybertronLM(model, tokenizer, batch_size)`: the model in eval mode and its tokenizer. Text is encoded
    without special tokens, and an empty context is the bos token (else eos), as lm_eval's HFLM does."""

    def __init__(self, model: Transformer, tokenizer: TextTokenizer, batch_size: int = 8):
        super().__init__()
        self.model = model.eval()
        self.cyber_tokenizer = tokenizer  # lm_eval reads `self.tokenizer` as a transformers tokenizer: not ours
        self.batch_size = batch_size
        self.max_length = model.config.max_seq_len
        self._engine: Engine | None = None

    @property
    def eot_token_id(self) -> int:
        return self.cyber_tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = self.cyber_tokenizer.bos_id
        return bos if bos is not None else self.cyber_tokenizer.eos_id

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.cyber_tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        scores = score_continuations(self.model, [(ctx, cont) for _, ctx, cont in requests], self.batch_size)
        for (key, _, _), score in zip(requests, scores):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, score)
        return scores

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each string's total log-likelihood over lm_eval's disjoint rolling windows of the model's context,
        conditioned on the prefix token."""
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(owners, self._loglikelihood_tokens(windows)):
            totals[owner] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each context continued by the engine (greedy unless the task samples) until a stop sequence, the
        end-of-text token or max_gen_toks; the context keeps its last tokens when it leaves too little room."""
        eos_text = self.cyber_tokenizer.decode([self.eot_token_id])
        prompts, params, stops = [], [], []
        for context, gen_kwargs in (req.args for req in requests):
            kwargs = normalize_gen_kwargs(dict(gen_kwargs), DEFAULT_MAX_GEN_TOKS)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            max_gen_toks = min(int(kwargs.pop("max_gen_toks")), self.max_length - 1)
            ids = self.tok_encode(context)[-(self.max_length - max_gen_toks):] or [self.prefix_token_id]
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            prompts.append(ids)
            params.append(SamplingParams(temperature=temperature, top_p=float(kwargs.get("top_p", 1.0) or 1.0),
                                         max_tokens=max_gen_toks, stop=tuple(until),
                                         seed=int(kwargs.get("seed", 0) or 0)))
            stops.append(until)
        results = self.engine().generate(prompts, params) if prompts else []
        texts = []
        for req, result, until in zip(requests, results, stops):
            text = result.text
            for stop in until:  # the engine stops before a stop string; cut any the text still holds
                text = text.split(stop)[0]
            texts.append(text)
            self.cache_hook.add_partial("generate_until", req.args, text)
        return texts

    def engine(self) -> Engine:
        """The serving engine, built at the first generation: batch_size sequences of the full context."""
        if self._engine is None:
            blocks = self.batch_size * -(-self.max_length // BLOCK_SIZE)
            self._engine = Engine(self.model, self.cyber_tokenizer, max_batch_size=self.batch_size,
                                  num_blocks=blocks, block_size=BLOCK_SIZE)
        return self._engine
