"""Prometheus text exposition of the server's counters and the engine's state (scraped at /metrics)."""

from __future__ import annotations

from cybertron.serve.async_engine import AsyncEngine


def render_metrics(runner: AsyncEngine, http: dict[str, int]) -> str:
    """Reads plain ints the engine thread updates; a scrape may be one step stale, never inconsistent
    enough to matter for monitoring."""
    engine, stats, cache = runner.engine, runner.engine.stats, runner.engine.cache
    rows = [
        ("cybertron_http_requests_total", "counter", "generation requests received", http["http_requests"]),
        ("cybertron_http_errors_total", "counter", "requests answered with an error", http["http_errors"]),
        ("cybertron_requests_total", "counter", "requests added to the engine", stats.requests_added),
        ("cybertron_requests_finished_total", "counter", "requests finished (stop or length)",
         stats.requests_finished),
        ("cybertron_requests_cancelled_total", "counter", "requests cancelled (client gone)",
         stats.requests_cancelled),
        ("cybertron_prompt_tokens_total", "counter", "prompt tokens received", stats.prompt_tokens),
        ("cybertron_generated_tokens_total", "counter", "tokens generated", stats.generated_tokens),
        ("cybertron_preemptions_total", "counter", "requests preempted for KV space", stats.preemptions),
        ("cybertron_prefix_cache_hit_tokens_total", "counter", "prompt tokens found in the prefix cache (not "
         "prefilled)", stats.prefix_hit_tokens),
        ("cybertron_prefill_tokens_total", "counter", "prompt tokens prefilled (recomputation included)",
         stats.prefill_tokens),
        ("cybertron_engine_failures_total", "counter", "engine steps that raised", runner.failures),
        ("cybertron_requests_running", "gauge", "requests being decoded", engine.num_running),
        ("cybertron_requests_waiting", "gauge", "requests waiting for admission", engine.num_waiting),
        ("cybertron_kv_blocks_total", "gauge", "KV cache blocks in the pool", cache.num_total_blocks),
        ("cybertron_kv_blocks_free", "gauge", "KV cache blocks free", cache.num_free_blocks),
        ("cybertron_kv_blocks_used", "gauge", "KV cache blocks held by requests",
         cache.num_total_blocks - cache.num_free_blocks),
        ("cybertron_kv_blocks_cached", "gauge", "KV cache blocks holding a cached prefix (in use or free)",
         engine.blocks.num_cached),
    ]
    if engine.speculator is not None:  # speculative decoding hook (serve/verify.py)
        spec = engine.speculator.stats
        rows += [
            ("cybertron_spec_verifications_total", "counter", "speculative steps (one per request verified)",
             spec.steps),
            ("cybertron_spec_proposed_tokens_total", "counter", "draft tokens checked by the model", spec.proposed),
            ("cybertron_spec_accepted_tokens_total", "counter", "draft tokens the model accepted", spec.accepted),
        ]
    lines = []
    for name, kind, help_, value in rows:
        lines += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"
