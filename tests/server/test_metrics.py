"""Prometheus exposition: vLLM's metric names, engine counters read at scrape time, per-request histograms."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest
from prometheus_client.parser import text_string_to_metric_families

from dsv32.server.metrics import ErrorCountingMiddleware, ServerMetrics


def engine_stats(**overrides: float) -> SimpleNamespace:
    values = dict(num_running=2, num_waiting=3, num_total_blocks=100, num_free_blocks=60, kv_cache_usage=0.4,
                  prefix_cache_queries=500, prefix_cache_hits=128, num_preemptions=1, prompt_tokens_total=700,
                  generation_tokens_total=90, spec_decode=None)
    values.update(overrides)
    return SimpleNamespace(**values)


def samples(metrics: ServerMetrics) -> dict[str, float]:
    """name{label=value,...} -> value, for every sample of the exposition."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            extra = {k: v for k, v in sample.labels.items() if k not in ("model_name", "engine")}
            key = sample.name + ("{" + ",".join(f"{k}={v}" for k, v in sorted(extra.items())) + "}" if extra else "")
            out[key] = sample.value
    return out


def test_engine_counters_use_vllm_names_and_are_read_at_scrape_time() -> None:
    stats = engine_stats()
    metrics = ServerMetrics("m", lambda: stats)
    first = samples(metrics)
    assert first["vllm:num_requests_running"] == 2
    assert first["vllm:num_requests_waiting"] == 3
    assert first["vllm:kv_cache_usage_perc"] == 0.4
    assert first["vllm:prefix_cache_queries_total"] == 500
    assert first["vllm:prefix_cache_hits_total"] == 128
    assert first["vllm:num_preemptions_total"] == 1
    assert first["vllm:prompt_tokens_total"] == 700
    assert first["vllm:generation_tokens_total"] == 90
    assert first["dsv32:kv_cache_free_blocks"] == 60 and first["dsv32:kv_cache_total_blocks"] == 100
    stats.num_running = 0
    assert samples(metrics)["vllm:num_requests_running"] == 0


def test_request_timings_and_outcomes_are_observed() -> None:
    metrics = ServerMetrics("m", engine_stats)
    timing = metrics.track(n=1, max_tokens=16)
    timing.on_tokens(1)
    timing.on_tokens(3)
    timing.on_tokens(3)  # no new tokens: nothing observed
    timing.on_finish("length", prompt_tokens=7, generation_tokens=3)
    metrics.track(n=2, max_tokens=4).on_finish("abort", prompt_tokens=5, generation_tokens=0)
    metrics.count_rejected("overloaded")
    got = samples(metrics)
    assert got["vllm:time_to_first_token_seconds_count"] == 1
    assert got["vllm:inter_token_latency_seconds_count"] == 2
    assert got["vllm:time_per_output_token_seconds_count"] == 2
    assert got["vllm:e2e_request_latency_seconds_count"] == 2
    assert got["vllm:request_prompt_tokens_sum"] == 12
    assert got["vllm:request_generation_tokens_sum"] == 3
    assert got["vllm:request_params_n_sum"] == 3
    assert got["vllm:request_success_total{finished_reason=length}"] == 1
    assert got["vllm:request_success_total{finished_reason=abort}"] == 1
    assert got["dsv32:requests_rejected_total{reason=overloaded}"] == 1


def test_two_servers_in_one_process_do_not_share_a_registry() -> None:
    a, b = ServerMetrics("a", engine_stats), ServerMetrics("b", engine_stats)
    a.track(1, 1).on_finish("stop", 1, 1)
    assert samples(a)["vllm:request_success_total{finished_reason=stop}"] == 1
    assert "vllm:request_success_total{finished_reason=stop}" not in samples(b)


def test_speculative_decoding_counters_use_vllm_names() -> None:
    from dsv32.engine.outputs import SpecDecodeStats

    spec = SpecDecodeStats()
    spec.observe(num_draft_tokens=3, num_accepted=2)
    spec.observe(num_draft_tokens=3, num_accepted=0)
    spec.observe(num_draft_tokens=2, num_accepted=2)
    values = samples(ServerMetrics("m", lambda: engine_stats(spec_decode=spec)))
    assert values["vllm:spec_decode_num_drafts_total"] == 3
    assert values["vllm:spec_decode_num_draft_tokens_total"] == 8
    assert values["vllm:spec_decode_num_accepted_tokens_total"] == 4
    per_pos = "vllm:spec_decode_num_accepted_tokens_per_pos_total{position=%d}"
    assert [values[per_pos % i] for i in range(3)] == [2, 2, 0]
    assert not any(name.startswith("vllm:spec_decode") for name in samples(ServerMetrics("m", engine_stats)))
    assert spec.mean_acceptance_length == pytest.approx(1 + 4 / 3)
    interval = spec.since(SpecDecodeStats(1, 3, 2, [1, 1, 0]))
    assert (interval.num_drafts, interval.num_accepted_tokens, interval.accepted_per_pos) == (2, 2, [1, 1, 0])
    line = interval.log_line(elapsed_s=2.0)
    assert "Mean acceptance length: 2.00" in line and "Per-position acceptance rate: 0.500, 0.500, 0.000" in line


def test_errors_are_counted_by_status_code_and_devices_exported() -> None:
    """Every error response is counted by ``ErrorCountingMiddleware`` whoever answered it, and errors sent inside
    a stream that had started (``count_error``) under their own code."""
    metrics = ServerMetrics("m", engine_stats, devices=8)

    async def app(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": scope["status"], "headers": []})
        await send({"type": "http.response.body", "body": b""})

    async def call(status: int) -> None:
        async def send(message) -> None:
            pass

        await ErrorCountingMiddleware(app, metrics)({"type": "http", "status": status}, None, send)

    for status in (200, 400, 400, 404, 503):
        asyncio.run(call(status))
    metrics.count_error(500)
    got = samples(metrics)
    assert got["dsv32:request_errors_total{code=400}"] == 2
    assert got["dsv32:request_errors_total{code=404}"] == 1
    assert got["dsv32:request_errors_total{code=503}"] == 1
    assert got["dsv32:request_errors_total{code=500}"] == 1
    assert "dsv32:request_errors_total{code=200}" not in got
    assert got["dsv32:engine_devices"] == 8
