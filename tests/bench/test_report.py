"""The result block (vLLM's exact layout), error summary, sweep table with cost per 1K tokens."""

from __future__ import annotations

import pytest

from dsv32.bench.report import SweepRow, format_errors, format_result_block, sweep_table, usd_per_1k_tokens

RESULT = {
    "completed": 100,
    "failed": 0,
    "max_concurrency": 64,
    "request_rate": 10.0,
    "duration": 129.34,
    "total_input_tokens": 204800,
    "total_output_tokens": 102400,
    "request_throughput": 0.773,
    "request_goodput": None,
    "output_throughput": 791.73,
    "max_output_tokens_per_s": 1300.0,
    "max_concurrent_requests": 100,
    "total_token_throughput": 2375.18,
    "mean_ttft_ms": 21100.0,
    "median_ttft_ms": 20000.0,
    "std_ttft_ms": 5.0,
    "p99_ttft_ms": 40000.0,
    "mean_tpot_ms": 99.7,
    "median_tpot_ms": 98.0,
    "std_tpot_ms": 1.0,
    "p99_tpot_ms": 120.0,
}


def test_block_matches_vllm_layout() -> None:
    lines = format_result_block(RESULT).splitlines()
    assert lines[0] == "============ Serving Benchmark Result ============"
    assert lines[1] == "Successful requests:                     100       "
    assert lines[3] == "Maximum request concurrency:             64        "
    assert lines[4] == "Request rate configured (RPS):           10.00     "
    assert lines[9] == "Output token throughput (tok/s):         791.73    "
    assert lines[11] == "Peak concurrent requests:                100.00    "
    assert lines[12] == "Total Token throughput (tok/s):          2375.18   "
    assert lines[13] == "---------------Time to First Token----------------"
    assert lines[14:17] == [
        "Mean TTFT (ms):                          21100.00  ",
        "Median TTFT (ms):                        20000.00  ",
        "P99 TTFT (ms):                           40000.00  ",
    ]
    assert lines[17] == "-----Time per Output Token (excl. 1st token)------"
    assert lines[-1] == "=" * 50
    assert not any("Inter-token" in line or "goodput" in line for line in lines)


def test_block_optional_lines() -> None:
    unlimited = {**RESULT, "max_concurrency": None, "request_rate": "inf", "request_goodput": 0.5}
    block = format_result_block(unlimited)
    assert "Maximum request concurrency" not in block and "Request rate configured" not in block
    assert "Request goodput (req/s):                 0.50      " in block.splitlines()


def test_error_summary_groups_and_counts() -> None:
    text = format_errors(["", "HTTP 500: x", "HTTP 500: x", "timeout", ""])
    assert text.splitlines() == ["Failed requests by error (2 distinct):", "  2 x HTTP 500: x", "  1 x timeout"]


def test_cost_per_1k_tokens_reproduces_the_seed_table() -> None:
    # 8 x H200 at USD 2.25/h serving 305.81 tok/s costs USD 0.0164 per 1K tokens in the seed's table.
    assert usd_per_1k_tokens(305.81, 2.25, 8) == pytest.approx(0.01635, abs=5e-5)
    assert usd_per_1k_tokens(0.0, 2.25, 8) == float("inf")


def test_sweep_table() -> None:
    rows = [
        SweepRow(8, 64, 0, 305.81, 900.0, 120.0, 300.0, 25.0, 40.0),
        SweepRow(16, 60, 4, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0),
    ]
    plain = sweep_table(rows).splitlines()
    assert len(plain) == 4 and "USD" not in plain[0]
    assert plain[2] == "| 8 | 64 | 0 | 305.81 | 900.00 | 120.00 | 300.00 | 25.00 | 40.00 |"
    priced = sweep_table(rows, gpu_hourly_usd=2.25, num_gpus=8).splitlines()
    assert priced[2].endswith("| USD 0.0164 | USD 0.0056 |")
    assert priced[3].endswith("| n/a | n/a |")
    assert "Output tokens are the generated tokens" in priced[-1]
