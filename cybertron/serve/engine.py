"""Continuous batching over a paged KV cache: the engine composes the scheduler (scheduler.py: queues,
admission, preemption, the per-step token budget and chunked prefill), the block manager (block_manager.py:
ref-counted blocks and the prefix cache) and the model runner (runner.py: batches and model calls).

Each `step()` is schedule -> run -> postprocess: running requests get room for their next token (the newest
are preempted if the pool is full), prompts are prefilled (in chunks when long, starting after any prefix
found in the cache), every other running request decodes one token, and each sampled token is appended.
Requests join and leave between steps, so a short request never waits for a long one to finish.

A preempted request gives back all its blocks and later re-enters with prompt + output so far as its new
prompt (recomputation, mostly from its own cached blocks); its generator keeps its state, so what it samples
is unchanged.

The engine is single-threaded: one thread calls add_request/cancel/step (see async_engine.py for the
server's background loop).

Serving runs one engine alone. A trainer that generates from weights sharded over ranks (GRPO under ZeRO-3)
hands each rank's engine a `Lockstep`: every rank then calls the model the same number of times per step,
so the collectives that gather each block's weights inside its forward are joined by every rank, whatever
work each one has. A trainer also changes the weights between generations: it calls reset_prefix_cache().
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from cybertron.data.tokenizer import TextTokenizer
from cybertron.errors import UserError
from cybertron.models.llama import Transformer
from cybertron.models.rope import longrope_switch
from cybertron.serve.block_manager import BlockManager
from cybertron.serve.cache import PagedKVCache
from cybertron.serve.detokenize import OutputText
from cybertron.serve.latent_cache import LatentKVCache, latent_bytes_per_block
from cybertron.serve.multi_lora import LoraAdapter, MultiLoRA, attach_adapters
from cybertron.serve.outputs import RequestOutput
from cybertron.serve.runner import ModelRunner, build_decode_graphs
from cybertron.serve.sampling import (
    NON_FINITE_LOGITS,
    InvalidParameter,
    SamplingBatch,
    SamplingParams,
    make_generator,
    sample,
)
from cybertron.serve.scheduler import PrefillChunk, Scheduler
from cybertron.serve.speculative import SpeculativeConfig
from cybertron.serve.structured import Matcher, token_mask
from cybertron.serve.verify import Speculator

CPU_KV_BUDGET_BYTES = 1 << 30  # default KV pool on CPU when neither num_blocks nor a budget is given
CUDA_KV_FRACTION = 0.5  # default KV pool on CUDA: this share of the memory free after loading the model


class Lockstep(Protocol):
    """Keeps the engines of several ranks calling one sharded model together (see the module docstring)."""

    def agree(self, forwards: int) -> int:
        """The most model calls any rank makes this step, given this rank's own count; every rank calls it
        once per step, 0 included (all ranks at 0: every engine is done)."""
        ...

    def idle_forward(self) -> None:
        """A model call without a request that joins the other ranks' collectives."""
        ...


class GenerationError(UserError):
    """A request could not be generated (the model produced non-finite logits for it)."""


@dataclass
class Result:
    """A finished generation. token_ids/logprobs hold every sampled token, the end-of-text token included
    (so they align with what a trainer scores); `text` excludes special tokens and ends before any stop
    string."""

    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    text: str = ""
    prompt_len: int = 0
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)


@dataclass
class EngineStats:
    requests_added: int = 0
    requests_finished: int = 0
    requests_cancelled: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    prefix_hit_tokens: int = 0  # prompt tokens found in the prefix cache: never prefilled
    prefill_tokens: int = 0  # prompt tokens computed by prefill (recomputation after preemption included)


@dataclass(eq=False)
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    generator: torch.Generator | None
    text: OutputText | None
    on_output: Callable[[RequestOutput], None] | None
    output: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)
    finish_reason: str | None = None
    # How often each token occurs in `output`, kept up to date as tokens come (only when a penalty needs it):
    # each step then reads it as it is, instead of counting the whole output again.
    counts: dict[int, int] | None = None
    num_computed: int = 0  # tokens whose KV is in the cache (the scheduler's count)
    adapter: str | None = None  # part of the prefix-cache key (KV computed under another adapter differs)
    matcher: Matcher | None = None  # structured output: where the request stands in its grammar
    rope_switch: int | None = None  # LongRoPE: a sequence longer than this runs with the long factors

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    @property
    def long_rope(self) -> bool:
        """Past LongRoPE's original context: all of this sequence's KV is computed with the long factors."""
        return self.rope_switch is not None and len(self.prompt) + len(self.output) > self.rope_switch

    @property
    def prefix_key(self) -> object:
        return (self.adapter, "longrope-long") if self.long_rope else self.adapter


class Engine:
    """`Engine(model, tokenizer)`; `add_request(prompt_ids, params)` -> id; `step()` -> outputs.

    max_prefill_tokens: the token budget of one step, shared by decode rows and prefill chunks (scheduler.py).
    chunked_prefill: a prompt longer than what the budget leaves is prefilled over several steps (False:
    whole prompts only, one larger than the budget alone). prefix_caching: prompts reuse the KV of cached
    full blocks (block_manager.py); call reset_prefix_cache() after the model's weights change.
    adapters: LoRA/DoRA adapters a request can name (add_request's `adapter`), served side by side in every
    batch (multi_lora.py); the model is wrapped in place."""

    def __init__(self, model: Transformer, tokenizer: TextTokenizer | None = None,
                 max_batch_size: int = 32, num_blocks: int | None = None, block_size: int = 16,
                 device: torch.device | str | None = None, kv_memory_bytes: int | None = None,
                 max_prefill_tokens: int = 4096, max_attention_keys: int = 1 << 20,
                 decode_graphs: bool | None = None, lockstep: Lockstep | None = None,
                 kv_heads: int | None = None, prefix_caching: bool = True, chunked_prefill: bool = True,
                 adapters: Sequence[LoraAdapter] = (), speculative: SpeculativeConfig | None = None):
        if speculative is not None and adapters:
            # A verification forward carries rows of several requests; their adapter rows are not set for it.
            raise UserError("speculative decoding cannot be combined with LoRA adapters (--lora) yet; use one "
                            "or the other")
        self.device = torch.device(device) if device is not None else next(model.parameters()).device
        self.model = model.to(self.device).eval()
        self.tokenizer = tokenizer
        self.config = model.config
        # LongRoPE (Phi-3): a sequence that grows past the original context is recomputed with the long
        # factors, as HF's generate does (_append); prefill chunks take their angles from the whole length.
        self.rope_switch = longrope_switch(self.config.rope_scaling)
        self.max_batch_size = max_batch_size
        self.max_prefill_tokens = max_prefill_tokens
        self.max_attention_keys = max_attention_keys
        # kv_heads: the KV heads this rank's attention holds (the model's, unless tensor parallelism splits them)
        self.cache = build_cache(model, self.device, block_size, num_blocks, kv_memory_bytes, max_batch_size,
                                 kv_heads)
        self.blocks = BlockManager(self.cache, prefix_caching)
        # A step of max_batch_size decode rows still leaves a block's worth of prefill, so a prompt always
        # progresses (a server may allow more rows than the default budget has tokens).
        budget = max(max_prefill_tokens, max_batch_size + block_size)
        self.scheduler = Scheduler(self.blocks, max_batch_size, budget, chunked_prefill)
        # multi-LoRA (multi_lora.py): decode graphs take each row's adapter slot as one more static input.
        if adapters and lockstep is not None:
            raise ValueError("LoRA adapters are served by an engine of its own, not under lockstep")
        self.lora: MultiLoRA | None = attach_adapters(self.model, adapters) if adapters else None
        self.decode_graphs = build_decode_graphs(self.model, self.cache, max_batch_size, decode_graphs, self.lora)
        if lockstep is not None and self.decode_graphs is not None:
            raise ValueError("a lockstep engine decodes eagerly: graphs cannot replay the gathers of sharded "
                             "weights")
        self.runner = ModelRunner(self.model, self.cache, self.device, self.decode_graphs, max_attention_keys,
                                  self.lora)
        self.lockstep = lockstep
        self._peers_busy = False  # under lockstep: some rank called the model in the last step
        self._eos = {tokenizer.eos_id} if tokenizer is not None else set()
        self._ids = itertools.count()
        self._requests: dict[int, _Request] = {}
        self.stats = EngineStats()
        # ---- speculative decoding hook (serve/verify.py): built last, it reads the cache and model above ----
        if speculative is not None and lockstep is not None:
            raise ValueError("a lockstep engine cannot speculate: ranks would call the model different numbers "
                             "of times")
        self.speculator = Speculator(speculative, self) if speculative is not None else None

    # ---- requests -------------------------------------------------------------------------------------
    def check_request(self, prompt_ids: Sequence[int], params: SamplingParams) -> None:
        """InvalidParameter (a UserError) if the request can never run. Reads only fixed settings, so any
        thread may call it."""
        params.validate()
        n, context = len(prompt_ids), self.config.max_seq_len
        if n == 0:
            raise InvalidParameter("prompt", "the prompt is empty; give at least one token")
        if n >= context:  # before the scan of every id below: a prompt of a million ids is refused at once
            raise InvalidParameter("prompt", f"the prompt has {n} tokens but the model's context is "
                                   f"{context}; shorten it", code="context_length_exceeded")
        if any(not 0 <= t < self.config.vocab_size for t in prompt_ids):
            raise InvalidParameter("prompt", f"prompt token ids must be in [0, {self.config.vocab_size})")
        if self.speculator is not None and self.rope_switch is not None and n + params.max_tokens > self.rope_switch:
            raise InvalidParameter("max_tokens", f"speculative decoding stops at LongRoPE's original context "
                                   f"({self.rope_switch} tokens; past it the cache is recomputed with the long "
                                   f"factors); ask for at most {self.rope_switch - n} or serve without "
                                   f"speculation", code="context_length_exceeded")
        if n + params.max_tokens > context:
            raise InvalidParameter("max_tokens", f"prompt ({n} tokens) + max_tokens ({params.max_tokens}) "
                                   f"exceeds the model's context of {context}; ask for at most "
                                   f"{context - n}", code="context_length_exceeded")
        need = self.cache.blocks_for(n + params.max_tokens)
        if need > self.cache.num_total_blocks:
            raise InvalidParameter("max_tokens", f"the request needs {need} KV cache blocks but the cache "
                                   f"has {self.cache.num_total_blocks}; ask for fewer tokens")
        if any(not t < self.config.vocab_size for t, _ in params.logit_bias):
            raise InvalidParameter("logit_bias", f"logit_bias token ids must be in [0, {self.config.vocab_size})")
        if params.stop and self.tokenizer is None:
            raise InvalidParameter("stop", "stop strings need a tokenizer; this engine has none")

    def add_request(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
                    on_output: Callable[[RequestOutput], None] | None = None, adapter: str | None = None) -> int:
        """Queue a request; it is admitted at the next step with room. Returns its id. `adapter` names the
        LoRA adapter it runs with (None: the base model)."""
        params = params or SamplingParams()
        self.check_request(prompt_ids, params)
        self.adapter_slot(adapter)
        text = OutputText(self.tokenizer, params.stop) if self.tokenizer is not None else None
        generator = None if params.greedy else make_generator(params.seed)
        request = _Request(next(self._ids), list(prompt_ids), params, generator, text, on_output,
                           counts={} if params.penalized else None,
                           matcher=params.grammar.matcher() if params.grammar is not None else None,
                           adapter=adapter, rope_switch=self.rope_switch)
        self._requests[request.id] = request
        self.scheduler.add(request)
        self.stats.requests_added += 1
        self.stats.prompt_tokens += len(request.prompt)
        return request.id

    @property
    def adapter_names(self) -> list[str]:
        """The LoRA adapters requests can name (add_request's `adapter`)."""
        return list(self.lora.names) if self.lora is not None else []

    def adapter_slot(self, adapter: str | None) -> int:
        """0 for the base (None), else the adapter's slot; InvalidParameter("model") naming an unknown one."""
        if adapter is None:
            return 0
        if adapter not in self.adapter_names:
            raise InvalidParameter("model", f"no adapter named {adapter!r} is loaded; adapters: "
                                   f"{', '.join(self.adapter_names) or 'none'}", code="model_not_found")
        return self.lora.slot(adapter)

    def cancel(self, request_id: int) -> bool:
        """Stop a request and free its blocks now; False if it already finished. Its consumer (on_output)
        gets a final output with finish_reason "cancelled"."""
        request = self._requests.get(request_id)
        if request is None:
            return False
        self._finish(request, "cancelled")
        self.stats.requests_cancelled += 1
        if request.on_output is not None:
            request.on_output(RequestOutput(request.id, [], [], [], "", True, "cancelled"))
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    @property
    def waiting(self) -> deque[_Request]:
        return self.scheduler.waiting  # type: ignore[return-value]

    @property
    def running(self) -> list[_Request]:
        return self.scheduler.running  # type: ignore[return-value]

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    def reset_prefix_cache(self) -> None:
        """Forget every cached prefix: what was cached was computed with the weights of before."""
        self.blocks.reset()

    # ---- one step: schedule -> run -> postprocess ------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration: make room, admit, prefill a chunk of the prompts being prefilled and decode one
        token for the others. Returns the outputs of this step (also handed to each request's on_output)."""
        # Under lockstep the weights are gathered into buffers that the trainer reuses after generation, and
        # tensors made in inference mode could not be written outside it: no_grad instead.
        with torch.inference_mode() if self.lockstep is None else torch.no_grad():
            plan = self.scheduler.schedule()
            self.stats.preemptions += len(plan.preempted)
            self.stats.prefix_hit_tokens += plan.hit_tokens
            decoding, produced = plan.decode, []
            if self.speculator is not None:  # speculative decoding hook: returns the requests it did not take
                decoding, produced = self.speculator.decode(self, decoding)
            groups = self._decode_groups(decoding)
            calls = len(groups) + bool(plan.prefill)
            agreed = calls if self.lockstep is None else self.lockstep.agree(calls)
            self._peers_busy = agreed > 0
            for group in groups:
                produced += self._decode(group)
            if plan.prefill:
                produced += self._prefill(plan.prefill)
            for _ in range(agreed - calls):
                self.lockstep.idle_forward()
        for request, output in produced:
            if request.on_output is not None:
                request.on_output(output)
        return [output for _, output in produced]

    def _decode_groups(self, requests: list[_Request]) -> list[list[_Request]]:
        groups = self.runner.decode_groups([len(r.tokens) for r in requests])
        return [[requests[i] for i in group] for group in groups]

    def _decode(self, requests: list[_Request]) -> list[tuple[_Request, RequestOutput]]:
        """One new token per request: the KV of each one's last token, then a sampled token."""
        sampling = self._sampling(requests)
        logits = self.runner.decode([r.id for r in requests], [r.tokens[-1] for r in requests],
                                    [len(r.tokens) - 1 for r in requests], self._adapter_slots(requests))
        return self._postprocess(requests, [1] * len(requests), logits, sampling)

    def _prefill(self, chunks: list[PrefillChunk]) -> list[tuple[_Request, RequestOutput]]:
        """One model call over every prefill chunk; the rows that reach the end of their prompt sample."""
        requests: list[_Request] = [c.seq for c in chunks]  # type: ignore[misc]
        done = [i for i, c in enumerate(chunks) if c.completes]
        sampling = self._sampling([requests[i] for i in done]) if done else None
        logits = self.runner.prefill([r.id for r in requests], [c.start for c in chunks],
                                     [r.tokens[c.start:c.start + c.length] for r, c in zip(requests, chunks)],
                                     self._adapter_slots(requests), [len(r.tokens) for r in requests])
        self.stats.prefill_tokens += sum(c.length for c in chunks)
        for request, chunk in zip(requests, chunks):
            # A chunk mid-prompt: nothing to sample yet. Its blocks are registered only once the prompt's
            # logits prove finite, so a prompt that turns out to produce NaN never had a block cached.
            if not chunk.completes:
                request.num_computed += chunk.length
        if not done:
            return []
        rows = logits if len(done) == len(chunks) else logits[done]
        return self._postprocess([requests[i] for i in done], [chunks[i].length for i in done], rows, sampling)

    def _adapter_slots(self, requests: list[_Request]) -> list[int] | None:
        """Each row's multi-LoRA slot (None without adapters)."""
        return None if self.lora is None else [self.lora.slot(r.adapter) for r in requests]

    def _sampling(self, requests: list[_Request]) -> SamplingBatch:
        # Every host -> device input, sampling's included, is sent before the forward is launched, and all
        # results come back in one transfer at the end.
        return SamplingBatch.build([r.params for r in requests], [r.generator for r in requests], self.device,
                                   [r.counts for r in requests])

    def _postprocess(self, requests: list[_Request], computed: list[int], logits: torch.Tensor,
                     sampling: SamplingBatch) -> list[tuple[_Request, RequestOutput]]:
        """Sample one token per row; a row with finite logits has its new KV registered for the prefix
        cache, then its token appended; a non-finite one fails alone."""
        # Structured output: the grammars' masks are computed on the host while the device runs the forward.
        sampling.allowed = token_mask([r.matcher for r in requests], logits.shape[-1], self.device)
        drawn = sample(logits, sampling)
        out = []
        for i, (request, n) in enumerate(zip(requests, computed)):
            if not drawn.finite[i]:
                out.append((request, self._fail(request, NON_FINITE_LOGITS)))
                continue
            request.num_computed += n
            self.blocks.commit(request.id, request.tokens, request.num_computed, request.prefix_key)
            out.append((request, self._append(request, drawn.tokens[i], drawn.logprobs[i], drawn.top_logprobs[i])))
        return out

    def _append(self, request: _Request, token: int, logprob: float,
                top: list[tuple[int, float]]) -> RequestOutput:
        request.output.append(token)
        request.logprobs.append(logprob)
        if request.counts is not None:
            request.counts[token] = request.counts.get(token, 0) + 1
        if request.params.top_logprobs:
            request.top_logprobs.append(top)
        self.stats.generated_tokens += 1
        params, text, reason = request.params, "", None
        is_eos = token in self._eos or token in params.stop_token_ids
        if is_eos and not params.ignore_eos:
            reason = "stop"
        elif request.text is not None:
            text = request.text.push(token)
            if request.text.stopped:
                reason = "stop"
        if reason is None and request.matcher is not None:
            reason = request.matcher.advance(token)  # structured output: "stop" once the grammar is complete
        if reason is None and (len(request.output) >= params.max_tokens
                               or len(request.tokens) >= self.config.max_seq_len):
            reason = "length"
        if reason is not None:
            if request.text is not None:
                text += request.text.finish()
            self._finish(request, reason)
        elif request.rope_switch is not None and len(request.tokens) == request.rope_switch + 1:
            # LongRoPE: this sequence just outgrew the original context, so from its next token on HF runs
            # all of it with the long factors: its KV, written with the short ones, is computed again.
            self.scheduler.recompute(request)
        return RequestOutput(request.id, [token], [logprob], [top] if params.top_logprobs else [], text,
                             reason is not None, reason, error=request.matcher.error if request.matcher else None)

    def _fail(self, request: _Request, message: str) -> RequestOutput:
        """End one request with an error. Its KV blocks may hold NaN, and a masked-out NaN key still turns
        attention into NaN (0 * NaN): the block manager zeroes them and never caches them."""
        self.blocks.fail(request.id)
        self._finish(request, "error")
        return RequestOutput(request.id, [], [], [], "", True, "error", error=message)

    def _finish(self, request: _Request, reason: str) -> None:
        request.finish_reason = reason
        self.scheduler.finish(request)
        del self._requests[request.id]
        if reason != "cancelled":
            self.stats.requests_finished += 1

    # ---- synchronous helpers ----------------------------------------------------------------------------

    def stream(self, prompt_ids: Sequence[int], params: SamplingParams | None = None,
               adapter: str | None = None) -> Iterator[RequestOutput]:
        """Add a request and step the engine until it finishes, yielding its outputs (other requests in the
        engine advance too). Closing the iterator early cancels the request."""
        mine: list[RequestOutput] = []
        request_id = self.add_request(prompt_ids, params, on_output=mine.append, adapter=adapter)
        finished = False
        try:
            while not finished:
                self.step()
                for output in mine:
                    if output.error is not None:
                        raise GenerationError(output.error)
                yield from mine
                finished = any(o.finished for o in mine)
                mine.clear()
        finally:
            if not finished:
                self.cancel(request_id)

    def generate(self, prompts: Sequence[Sequence[int]],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 adapters: Sequence[str | None] | None = None) -> list[Result]:
        """Run every prompt to completion (batched continuously) and return the results in prompt order.
        `adapters`: the LoRA adapter of each prompt (None entries, or no list: the base model)."""
        per_prompt = params if isinstance(params, Sequence) else [params or SamplingParams()] * len(prompts)
        if len(per_prompt) != len(prompts):
            raise ValueError(f"{len(per_prompt)} SamplingParams for {len(prompts)} prompts")
        adapters = list(adapters) if adapters is not None else [None] * len(prompts)
        if len(adapters) != len(prompts):
            raise ValueError(f"{len(adapters)} adapters for {len(prompts)} prompts")
        for prompt, p, adapter in zip(prompts, per_prompt, adapters):
            self.check_request(prompt, p)  # all or nothing: no request is left behind in the engine
            self.adapter_slot(adapter)
        collected: list[list[RequestOutput]] = [[] for _ in prompts]
        for prompt, p, sink, adapter in zip(prompts, per_prompt, collected, adapters):
            self.add_request(prompt, p, on_output=sink.append, adapter=adapter)
        # Under lockstep a rank whose requests are done keeps stepping (idle) until every rank's are.
        self._peers_busy = self.lockstep is not None
        while not all(sink and sink[-1].finished for sink in collected) or self._peers_busy:
            self.step()
        failed = [(i, sink[-1].error) for i, sink in enumerate(collected) if sink[-1].error is not None]
        if failed:
            raise GenerationError(f"prompt {failed[0][0]}: {failed[0][1]}")
        return [_result(prompt, sink) for prompt, sink in zip(prompts, collected)]


def _result(prompt: Sequence[int], outputs: list[RequestOutput]) -> Result:
    return Result(token_ids=[t for o in outputs for t in o.token_ids],
                  logprobs=[lp for o in outputs for lp in o.logprobs],
                  finish_reason=outputs[-1].finish_reason or "stop",
                  text="".join(o.text for o in outputs), prompt_len=len(prompt),
                  top_logprobs=[t for o in outputs for t in o.top_logprobs])


def build_cache(model: Transformer, device: torch.device, block_size: int, num_blocks: int | None,
                kv_memory_bytes: int | None, max_batch_size: int, kv_heads: int | None = None) -> PagedKVCache:
    """A pool in the model's dtype, sized by num_blocks, else by default_num_blocks."""
    cfg, dtype = model.config, next(model.parameters()).dtype
    if num_blocks is None:
        num_blocks = default_num_blocks(model, block_size, dtype, device, max_batch_size, kv_memory_bytes)
    if cfg.is_mla:  # multi-head latent attention caches one compressed latent per token (serve/latent_cache.py)
        return LatentKVCache(cfg, num_blocks, block_size, dtype, device)
    cache = PagedKVCache(cfg.n_layers, kv_heads or cfg.n_kv_heads, cfg.head_size, num_blocks, block_size, dtype,
                         device)
    cache.layer_windows = [cfg.layer_window(i) for i in range(cfg.n_layers)]  # sliding layers mask old keys
    cache.attn_softcap = cfg.attn_softcap  # Gemma 2: capped attention scores
    return cache


def default_num_blocks(model: Transformer, block_size: int, dtype: torch.dtype, device: torch.device,
                       max_batch_size: int, kv_memory_bytes: int | None) -> int:
    """Blocks for `kv_memory_bytes`, else enough for max_batch_size full contexts, capped by a default
    budget (1 GiB on CPU; half the free memory on CUDA)."""
    cfg = model.config
    per_block = PagedKVCache.bytes_per_block(cfg.n_layers, cfg.n_kv_heads, cfg.head_size, block_size, dtype)
    if cfg.is_mla:
        per_block = latent_bytes_per_block(cfg, block_size, dtype)
    if kv_memory_bytes is None:
        want = max_batch_size * -(-cfg.max_seq_len // block_size)
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = int(free * CUDA_KV_FRACTION)
        else:
            budget = CPU_KV_BUDGET_BYTES
        return max(1, min(want, budget // per_block))
    blocks = kv_memory_bytes // per_block
    if blocks < 1:
        raise InvalidParameter("kv_memory_bytes", f"a KV budget of {kv_memory_bytes} bytes holds no block "
                               f"(one block takes {per_block} bytes)")
    return int(blocks)
