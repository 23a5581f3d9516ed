"""Speculative decoding in the engine: greedy output identical to plain decoding (prompt lookup and draft
models, stops and limits at the edge, preemption), a draft equal to the target accepts everything, requests
speculation does not support decode normally, and sampled output keeps the target's distribution."""

import pytest
import torch

from cybertron.errors import ConfigError, UserError
from cybertron.models.llama import build_model
from cybertron.models.presets import preset_config
from cybertron.serve.engine import Engine
from cybertron.serve.sampling import SamplingParams
from cybertron.serve.speculative import SpeculativeConfig, ngram_lookup
from tests.unit.serve.serve_helpers import random_prompts


def test_ngram_lookup_proposes_what_followed_the_longest_most_recent_match():
    tokens = [5, 1, 2, 3, 9, 1, 2, 4, 7, 1, 2]
    assert ngram_lookup(tokens, 2, 1, 3) == [4, 7]  # "1 2" last occurred before "4 7"
    assert ngram_lookup([1, 2, 3, 8, 2, 3, 9, 1, 2, 3], 2, 1, 3) == [8, 2]  # "1 2 3" beats the later "2 3"
    assert ngram_lookup([1, 2, 3, 4], 3, 1, 3) == []
    assert ngram_lookup([7, 8, 7, 8], 5, 2, 2) == [7, 8, 7, 8, 7]  # short period: the repetition goes on
    assert ngram_lookup([4, 4, 4], 3, 1, 1) == [4, 4, 4]
    assert ngram_lookup([1, 2, 9, 1, 2], 2, 3, 3) == []  # only n = 3 allowed, and "9 1 2" is new
    # ids as bytes: 256, 0 holds the bytes of 1 across its boundary, which is no occurrence of 1
    assert ngram_lookup([256, 0, 5, 1], 2, 1, 1) == []
    assert ngram_lookup([1, 7, 256, 0, 5, 1], 2, 1, 1) == [7, 256]


def _lookup_by_scanning(tokens, k, n_min, n_max):
    """The definition, token by token: the longest n first, then the latest earlier occurrence."""
    for n in range(min(n_max, len(tokens) - 1), n_min - 1, -1):
        for start in range(len(tokens) - n - 1, -1, -1):
            if tokens[start:start + n] == tokens[-n:]:
                context = list(tokens)
                while len(context) < len(tokens) + k:  # the continuation, repeating with its period
                    context.append(context[len(context) - (len(tokens) - start - n)])
                return context[len(tokens):]
    return []


def test_ngram_lookup_equals_a_plain_scan_on_random_token_streams():
    """Ids above 255 and small vocabularies: a byte-level match that straddles two ids must not count."""
    gen = torch.Generator().manual_seed(0)
    for case in range(3000):
        vocab = [2, 3, 7, 300, 70000][case % 5]
        tokens = torch.randint(0, vocab, (int(torch.randint(1, 30, ())),), generator=gen).tolist()
        n_min = 1 + case % 3
        n_max = n_min + case % 2
        assert ngram_lookup(tokens, 1 + case % 5, n_min, n_max) == \
            _lookup_by_scanning(tokens, 1 + case % 5, n_min, n_max), tokens


def truncated(model, n_layers):
    """The model's first n_layers blocks with its embedding and head: a smaller draft that agrees with it
    often but not always."""
    draft = build_model(preset_config("debug", vocab_size=model.config.vocab_size, n_layers=n_layers)).eval()
    draft.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("layers.") or int(k.split(".")[1]) < n_layers})
    return draft


@pytest.fixture(scope="module")
def small_draft(debug_model):
    return truncated(debug_model, 1)


def _prompts():
    prompts = random_prompts([1, 6, 13, 3, 9], seed=11)
    prompts[2] = prompts[2] * 3  # repetition for prompt lookup to find
    prompts[4] = (prompts[4][:4] * 5)[:19]
    return prompts


def _params():
    return [SamplingParams(temperature=0.0, max_tokens=m) for m in (1, 2, 5, 17, 24)]


def _speculative(method, debug_model, small_draft):
    return {"ngram": SpeculativeConfig("ngram", k=4, ngram_min=1, ngram_max=3),
            "draft-self": SpeculativeConfig("draft", k=3, draft=debug_model),
            "draft-small": SpeculativeConfig("draft", k=5, draft=small_draft)}[method]


@pytest.mark.parametrize("method, static_decode", [("ngram", False), ("draft-self", False), ("draft-small", False),
                                                   ("draft-small", True)])
def test_greedy_speculation_is_identical_to_plain_decoding(debug_model, small_draft, method, static_decode):
    """static_decode: the requests not speculated for this step take the padded, CUDA-graph-shaped path."""
    prompts, params = _prompts(), _params()
    plain = Engine(debug_model, max_batch_size=8, num_blocks=64, block_size=4).generate(prompts, params)
    # A stop token in the middle of the longest output: speculation must end the request right there.
    stop = plain[4].token_ids[9]
    params[4] = SamplingParams(temperature=0.0, max_tokens=24, stop_token_ids=(stop,))
    plain[4] = Engine(debug_model, num_blocks=64, block_size=4).generate([prompts[4]], params[4])[0]
    assert plain[4].finish_reason == "stop" and len(plain[4].token_ids) <= 10

    engine = Engine(debug_model, max_batch_size=8, num_blocks=64, block_size=4, decode_graphs=static_decode,
                    speculative=_speculative(method, debug_model, small_draft))
    results = engine.generate(prompts, params)
    for expected, result in zip(plain, results):
        assert result.token_ids == expected.token_ids
        assert result.finish_reason == expected.finish_reason
        torch.testing.assert_close(result.logprobs, expected.logprobs, atol=1e-5, rtol=0)
    stats = engine.speculator.stats
    assert stats.proposed > stats.accepted > 0 or (method == "draft-self" and stats.accepted == stats.proposed > 0)
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks


def test_a_draft_equal_to_the_target_is_always_accepted(debug_model):
    engine = Engine(debug_model, max_batch_size=8, num_blocks=64, block_size=4,
                    speculative=SpeculativeConfig("draft", k=4, draft=debug_model))
    engine.generate(random_prompts([3, 8, 20], seed=4), SamplingParams(temperature=0.0, max_tokens=30))
    stats = engine.speculator.stats
    assert stats.proposed > 50 and stats.acceptance_rate == 1.0
    assert stats.emitted > 2 * stats.steps  # several tokens per target forward


def test_speculation_stops_at_the_context_end(debug_model):
    """max_tokens reaching exactly the model's context (256): the last step cannot overshoot it."""
    prompt = random_prompts([250], seed=5)[0]
    params = SamplingParams(temperature=0.0, max_tokens=6)
    plain = Engine(debug_model, num_blocks=80, block_size=4).generate([prompt], params)[0]
    engine = Engine(debug_model, num_blocks=80, block_size=4,
                    speculative=SpeculativeConfig("draft", k=8, draft=debug_model))
    result = engine.generate([prompt], params)[0]
    assert result.token_ids == plain.token_ids and result.finish_reason == "length"
    assert engine.speculator.stats.proposed > 0


def test_stop_strings_cut_speculated_text_where_plain_decoding_does(text_model, tokenizer):
    """A draft equal to the target: every step appends several tokens, and the stop string lies inside."""
    prompt = tokenizer.encode("The quick brown fox jumps over the lazy dog. The quick brown fox jumps")
    greedy = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    full = Engine(text_model, tokenizer, num_blocks=32, block_size=8).generate([prompt], greedy)[0].text
    stop = full[len(full) // 2:len(full) // 2 + 3]
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=(stop,))
    plain = Engine(text_model, tokenizer, num_blocks=32, block_size=8).generate([prompt], params)[0]
    engine = Engine(text_model, tokenizer, num_blocks=32, block_size=8,
                    speculative=SpeculativeConfig("draft", k=6, draft=text_model))
    result = engine.generate([prompt], params)[0]
    assert (result.text, result.token_ids, result.finish_reason) == (plain.text, plain.token_ids, "stop")
    assert engine.speculator.stats.emitted > engine.speculator.stats.steps


def test_preempted_requests_keep_their_tokens_under_speculation(debug_model):
    prompts = random_prompts([10, 12, 9, 11], seed=2)
    params = SamplingParams(temperature=0.0, max_tokens=20)
    plain = Engine(debug_model, max_batch_size=4, num_blocks=64, block_size=4).generate(prompts, params)
    engine = Engine(debug_model, max_batch_size=4, num_blocks=12, block_size=4,
                    speculative=SpeculativeConfig("draft", k=3, draft=debug_model))
    results = engine.generate(prompts, params)
    assert engine.stats.preemptions > 0
    assert [r.token_ids for r in results] == [p.token_ids for p in plain]
    assert engine.cache.num_free_blocks == engine.cache.num_total_blocks
    draft_cache = engine.speculator.proposer.cache
    engine.step()  # the draft pool lets go of finished requests at its next step
    assert draft_cache.num_free_blocks == draft_cache.num_total_blocks


def test_blocks_computed_under_speculation_are_reused_correctly_from_the_prefix_cache(debug_model, small_draft):
    """A later prompt that extends an earlier request's output reuses the blocks its speculative steps
    filled: only accepted positions may have been registered, or the continuation would differ."""
    first = random_prompts([9], seed=8)[0]
    params = SamplingParams(temperature=0.0, max_tokens=30)
    engine = Engine(debug_model, num_blocks=64, block_size=4,
                    speculative=SpeculativeConfig("draft", k=4, draft=small_draft))
    output = engine.generate([first], params)[0].token_ids
    assert engine.speculator.stats.proposed > engine.speculator.stats.accepted > 0
    follow = first + output[:25]
    result = engine.generate([follow], SamplingParams(temperature=0.0, max_tokens=12))[0]
    assert engine.stats.prefix_hit_tokens >= 28  # 7 of the follow-up's blocks came from the cache
    plain = Engine(debug_model, num_blocks=64, block_size=4, prefix_caching=False)
    assert result.token_ids == plain.generate([follow], SamplingParams(temperature=0.0, max_tokens=12))[0].token_ids


def test_a_request_whose_drafts_keep_failing_backs_off(debug_model):
    """Sampled from a random model, prompt lookup's drafts fail every time: the request is tried again after
    1, 2, 4, 8 and 16 plain steps, so a few verifications in 60 tokens instead of one per step."""
    prompt = random_prompts([7], seed=12)[0] * 3
    engine = Engine(debug_model, num_blocks=64, block_size=4,
                    speculative=SpeculativeConfig("ngram", k=4, ngram_min=1))
    result = engine.generate([prompt], SamplingParams(temperature=0.9, max_tokens=60, seed=1))[0]
    stats = engine.speculator.stats
    assert len(result.token_ids) == 60 and stats.accepted == 0
    assert 3 <= stats.steps <= 7  # tried at decode steps 1, 3, 6, 11, 20, 37, 54 at most


def test_a_seeded_request_samples_the_same_text_whatever_else_is_in_the_batch(debug_model):
    """A request without drafts rides along in another one's verification forward and samples with the
    engine's own sampler there: its seed alone still decides its text, as without speculation."""
    mine = random_prompts([6], seed=13)[0]
    params = SamplingParams(temperature=1.0, max_tokens=24, seed=21)
    plain = Engine(debug_model, num_blocks=64, block_size=4).generate([mine], params)[0].token_ids
    spec = SpeculativeConfig("ngram", k=4, ngram_min=3)
    alone = Engine(debug_model, num_blocks=64, block_size=4, speculative=spec)
    assert alone.generate([mine], params)[0].token_ids == plain
    assert alone.speculator.stats.proposed == 0  # its text never repeats 3 tokens: it never speculates
    together = Engine(debug_model, num_blocks=64, block_size=4, speculative=spec)
    repetitive = random_prompts([5], seed=14)[0] * 4
    results = together.generate([repetitive, mine], [SamplingParams(temperature=0.0, max_tokens=24), params])
    assert together.speculator.stats.proposed > 0 and results[1].token_ids == plain


def test_requests_speculation_does_not_support_decode_normally(debug_model):
    prompt = random_prompts([5], seed=6)[0] * 4
    params = [SamplingParams(temperature=0.0, max_tokens=12, logit_bias=((3, 5.0),)),
              SamplingParams(temperature=0.0, max_tokens=12, frequency_penalty=1.0),
              SamplingParams(temperature=0.0, max_tokens=12, top_logprobs=2)]
    plain = Engine(debug_model, num_blocks=64, block_size=4).generate([prompt] * 3, params)
    engine = Engine(debug_model, num_blocks=64, block_size=4, speculative=SpeculativeConfig("ngram"))
    results = engine.generate([prompt] * 3, params)
    assert [(r.token_ids, r.top_logprobs) for r in results] == [(p.token_ids, p.top_logprobs) for p in plain]
    assert engine.speculator.stats.proposed == 0


def test_bad_speculative_configs_are_refused(debug_model, text_model):
    with pytest.raises(UserError, match="vocabulary has 320 tokens but the target's has 256"):
        Engine(debug_model, num_blocks=8, speculative=SpeculativeConfig("draft", draft=text_model))
    with pytest.raises(ConfigError, match="speculative.k must be >= 1"):
        Engine(debug_model, num_blocks=8, speculative=SpeculativeConfig("ngram", k=0))
    with pytest.raises(ConfigError, match="needs a draft model"):
        Engine(debug_model, num_blocks=8, speculative=SpeculativeConfig("draft"))
    with pytest.raises(ConfigError, match="ngram_min <= ngram_max"):
        Engine(debug_model, num_blocks=8, speculative=SpeculativeConfig("ngram", ngram_min=3, ngram_max=2))


@pytest.fixture(scope="module")
def peaked_model():
    """Vocabulary 8 with sharp next-token distributions, so a wrong acceptance rule shows in the counts."""
    model = build_model(preset_config("debug", vocab_size=8), seed=3).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)
    return model


def _exact_marginals(model, prompt, steps, params):
    """P(token at each of the first `steps` generated positions) by enumerating every path (vocab 8)."""
    from cybertron.serve.rejection import filtered_probs

    paths, weights = [list(prompt)], torch.ones(1, dtype=torch.float64)
    marginals = []
    with torch.no_grad():
        for _ in range(steps):
            logits = model(torch.tensor(paths))[:, -1].float()
            probs = filtered_probs(logits, [params] * len(paths)).double() * weights[:, None]  # (paths, 8)
            marginals.append(probs.sum(0))
            paths = [path + [t] for path in paths for t in range(8)]
            weights = probs.flatten()
    return marginals


@pytest.mark.parametrize("method", ["ngram", "draft"])
def test_sampled_speculation_keeps_the_targets_distribution(peaked_model, debug_model, method):
    """Many seeds, one engine: the empirical distribution of tokens 2-4 (produced by verification) matches
    the exact marginals of plain sampling within a generous bound; the drafts alone would not."""
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]
    params = SamplingParams(temperature=0.8, top_k=6, max_tokens=4)
    draft = build_model(preset_config("debug", vocab_size=8, n_layers=1), seed=9).eval()
    spec = SpeculativeConfig("ngram", k=3) if method == "ngram" else SpeculativeConfig("draft", k=3, draft=draft)
    engine = Engine(peaked_model, max_batch_size=256, num_blocks=600, block_size=4, speculative=spec)
    n = 1200
    results = engine.generate([prompt] * n, [SamplingParams(temperature=0.8, top_k=6, max_tokens=4, seed=s)
                                             for s in range(n)])
    exact = _exact_marginals(peaked_model, prompt, 4, params)
    stats = engine.speculator.stats
    assert stats.proposed > n and stats.accepted > 50 and stats.acceptance_rate < 0.95  # both paths taken
    for position in (1, 2, 3):
        counts = torch.bincount(torch.tensor([r.token_ids[position] for r in results]), minlength=8)
        total_variation = 0.5 * (counts.double() / n - exact[position]).abs().sum().item()
        assert total_variation < 0.06, (position, counts, exact[position])
