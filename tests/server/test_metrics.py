"""Prometheus exposition: vLLM's metric names, engine counters read at scrape time, per-request histograms."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from dsv32.server.metrics import ServerMetrics


def engine_stats(**overrides: float) -> SimpleNamespace:
    values = dict(num_running=2, num_waiting=3, num_total_blocks=100, num_free_blocks=60, kv_cache_usage=0.4,
                  prefix_cache_queries=500, prefix_cache_hits=128, num_preemptions=1, prompt_tokens_total=700,
                  generation_tokens_total=90)
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
