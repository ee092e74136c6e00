"""Serving metrics on a synthetic timeline: TTFT / TPOT / ITL / E2EL arithmetic, peaks, goodput, arrival schedule."""

from __future__ import annotations

import numpy as np
import pytest

from dsv32.bench.datasets import TokenCounter
from dsv32.bench.serve import (
    MetricSummary,
    RequestOutcome,
    arrival_offsets,
    compute_metrics,
    peak_concurrency,
    peak_output_tokens_per_s,
    result_dict,
)


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter.load()


def timeline() -> list[RequestOutcome]:
    """Four requests: 4 tokens (usage), 2 tokens (counted from text), 1 token, and a failure."""
    return [
        RequestOutcome(
            prompt_len=10, start_time=0.0, success=True, ttft=0.1, itl=[0.02, 0.03, 0.05], latency=0.2, output_tokens=4
        ),
        RequestOutcome(
            prompt_len=20,
            start_time=0.05,
            success=True,
            ttft=0.2,
            itl=[0.1],
            latency=0.3,
            generated_text=" hello world",
        ),
        RequestOutcome(prompt_len=5, start_time=1.2, success=True, ttft=0.05, latency=0.05, output_tokens=1),
        RequestOutcome(prompt_len=99, start_time=0.5, error="HTTP 500: boom"),
    ]


def test_counts_and_throughputs(counter: TokenCounter) -> None:
    metrics = compute_metrics(timeline(), duration_s=2.0, count_tokens=counter)
    assert (metrics.completed, metrics.failed) == (3, 1)
    assert metrics.output_lens == [4, 2, 1, 0]  # " hello world" re-tokenizes to 2; failures count 0
    assert metrics.total_input == 35  # failed requests' prompts are not counted
    assert metrics.total_output == 7
    assert metrics.request_throughput == pytest.approx(1.5)
    assert metrics.output_throughput == pytest.approx(3.5)
    assert metrics.total_token_throughput == pytest.approx(21.0)


def test_latency_samples_follow_vllm_definitions(counter: TokenCounter) -> None:
    metrics = compute_metrics(timeline(), duration_s=2.0, count_tokens=counter)
    assert metrics.ttfts == [0.1, 0.2, 0.05]
    assert metrics.e2els == [0.2, 0.3, 0.05]
    # TPOT excludes the first token: (latency - ttft) / (output_len - 1); one-token outputs have none.
    assert metrics.tpots == pytest.approx([(0.2 - 0.1) / 3, (0.3 - 0.2) / 1])
    # ITL: every gap between chunks, all requests pooled.
    assert metrics.itls == [0.02, 0.03, 0.05, 0.1]


def test_summary_statistics_are_numpys(counter: TokenCounter) -> None:
    metrics = compute_metrics(timeline(), duration_s=2.0, count_tokens=counter)
    summary = metrics.summary("itl", [50.0, 90.0, 99.0])
    data = np.array([20.0, 30.0, 50.0, 100.0])
    assert summary.mean_ms == pytest.approx(np.mean(data))
    assert summary.median_ms == pytest.approx(np.median(data))
    assert summary.std_ms == pytest.approx(np.std(data))
    assert [p for p, _ in summary.percentiles_ms] == [50.0, 90.0, 99.0]
    assert [v for _, v in summary.percentiles_ms] == pytest.approx([np.percentile(data, q) for q in (50, 90, 99)])
    assert summary.percentiles_ms[1][1] == pytest.approx(50.0 + 0.7 * 50.0)  # linear interpolation


def test_empty_metric_reports_zero() -> None:
    assert MetricSummary.of([], [99.0]) == MetricSummary(0.0, 0.0, 0.0, [(99.0, 0.0)])


def test_peaks() -> None:
    outcomes = timeline()
    # Chunks at 0.1, 0.12, 0.15, 0.2, 0.25, 0.35 fall in second 0; the one at 1.25 in second 1.
    assert peak_output_tokens_per_s(outcomes) == 6.0
    assert peak_concurrency(outcomes) == 2
    back_to_back = [
        RequestOutcome(prompt_len=1, start_time=0.0, success=True, latency=0.5),
        RequestOutcome(prompt_len=1, start_time=0.5, success=True, latency=0.5),
    ]
    assert peak_concurrency(back_to_back) == 1  # [start, end): touching intervals do not overlap


def test_goodput_counts_requests_meeting_every_slo(counter: TokenCounter) -> None:
    by_ttft = compute_metrics(timeline(), 2.0, counter, {"ttft": 150.0})
    assert by_ttft.request_goodput == pytest.approx(2 / 2.0)
    # The one-token request has TPOT 0 for the SLO; the 2-token request's TPOT is 100 ms.
    by_tpot = compute_metrics(timeline(), 2.0, counter, {"tpot": 50.0})
    assert by_tpot.request_goodput == pytest.approx(2 / 2.0)
    both = compute_metrics(timeline(), 2.0, counter, {"ttft": 150.0, "e2el": 100.0})
    assert both.request_goodput == pytest.approx(1 / 2.0)


def test_result_keys_follow_selected_metrics(counter: TokenCounter) -> None:
    outcomes = timeline()
    metrics = compute_metrics(outcomes, 2.0, counter)
    result = result_dict(metrics, outcomes, 2.0, ["ttft", "e2el"], [50.0, 99.9], with_goodput=False)
    assert result["request_goodput"] is None
    assert {"mean_ttft_ms", "median_ttft_ms", "std_ttft_ms", "p50_ttft_ms", "p99.9_ttft_ms", "p99.9_e2el_ms"} <= set(
        result
    )
    assert not any(key.endswith("_tpot_ms") or key.endswith("_itl_ms") for key in result)
    assert result["p50_ttft_ms"] == pytest.approx(100.0)
    assert result["errors"] == ["", "", "", "HTTP 500: boom"]
    assert result["output_lens"] == [4, 2, 1, 0]


def test_arrival_schedule() -> None:
    rng = np.random.default_rng(0)
    assert arrival_offsets(4, float("inf"), 1.0, rng) == [0.0] * 4
    poisson = arrival_offsets(50, 10.0, 1.0, rng)
    assert poisson[-1] == pytest.approx(5.0)  # rescaled so the offered load is exactly 10 req/s
    assert all(b > a for a, b in zip(poisson, poisson[1:], strict=False))
    assert arrival_offsets(4, 2.0, float("inf"), rng) == pytest.approx([0.5, 1.0, 1.5, 2.0])
    with pytest.raises(ValueError):
        arrival_offsets(4, 0.0, 1.0, rng)
