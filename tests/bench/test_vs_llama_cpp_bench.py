"""``benchmarks/vs_llama_cpp.py``'s pure parts: llama.cpp's reference ranges read from the peers' README, the peer
check that marks a handicapped llama.cpp, dsv32's rates from the worker's seconds, llama.cpp's JSON lines among its
log lines, and the serving summary (failed requests and their errors)."""

from __future__ import annotations

import pathlib

import pytest

from tests.benchmark_scripts import benchmark_module

README = """## vLLM-CPU notes
- concurrency 1: 104.6 output tok/s, TTFT 22.4 ms, TPOT 9.1 ms

## llama.cpp (what Ollama runs)
Figures seen here (V3.2 bf16, kv_lora 512, rope 64, indexer 16 x 128, top-k 64, hidden 256, 4 layers; 2 threads,
prompt 128, 32 new tokens; noise about ±15%): decode **216-262 tok/s at batch 1**, 501-518 tok/s at batch 8;
prefill (pp128) 2000-2500 tok/s at batch 1.
"""


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("vs_llama_cpp.py") as module:
        yield module


def test_reads_llama_cpps_reference_ranges(bench, tmp_path: pathlib.Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert bench.read_llama_references(readme) == {"decode@1": (216, 262), "decode@8": (501, 518),
                                                   "prefill@1": (2000, 2500)}
    assert bench.read_llama_references(tmp_path / "missing.md") == {}


def test_peer_check_flags_a_llama_cpp_far_below_its_reference(bench) -> None:
    references = {"decode@1": (216.0, 262.0)}
    spread = bench.Spread.of
    verdict, broken = bench.peer_check("decode@1", spread([190.0, 200.0, 230.0]), references, threads=2)
    assert not broken and verdict.startswith("ok")  # 200 is below the range, within its noise
    verdict, broken = bench.peer_check("decode@1", spread([150.0, 160.0, 300.0]), references, threads=2)
    assert broken and "BROKEN" in verdict  # the median, not the best, is checked
    assert bench.peer_check("decode@1", None, references, threads=2)[1]
    assert bench.peer_check("decode@1", spread([1.0]), references, threads=4) == (
        "not comparable (reference at 2 threads)", False)
    assert bench.peer_check("prefill@8", spread([1.0]), references, threads=2) == ("no reference", False)


def test_spread_is_median_and_range(bench) -> None:
    spread = bench.Spread.of([3.0, 1.0, 10.0, 2.0])
    assert (spread.median, spread.low, spread.high, spread.count) == (2.5, 1.0, 10.0, 4)
    assert spread.show() == "2.5 (1.0-10.0)"
    assert bench.Spread.of([]) is None and bench.show(None) == "n/a"
    assert bench.median_ratio(bench.Spread.of([4.0]), bench.Spread.of([2.0])) == "2.00x"


def test_offline_rates_from_the_workers_seconds(bench) -> None:
    # batch 1: 128 prompt tokens in 0.1 s, 31 more in 0.31 s; batch 8: one repeat whose full generate timed faster
    # than its prefill alone (noise): a prefill sample, no decode sample.
    timings = {"1": {"prefill_s": [0.1], "full_s": [0.41]}, "8": {"prefill_s": [0.5, 0.5], "full_s": [1.5, 0.4]}}
    rates = bench.offline_rates(timings)
    assert rates["prefill@1"] == pytest.approx([1280.0])
    assert rates["decode@1"] == pytest.approx([100.0])
    assert rates["prefill@8"] == pytest.approx([2048.0, 2048.0])
    assert rates["decode@8"] == pytest.approx([8 * 31 / 1.0])


def test_json_lines_skip_the_log_around_them(bench, tmp_path: pathlib.Path) -> None:
    log = tmp_path / "batched.log"
    log.write_text('llama_model_loader: loaded\n{"pl": 1, "speed_tg": 250.5}\n{not json\n'
                   '0.00.2 W llama_context: setting\n{"pl": 8, "speed_tg": 510.0}\n')
    assert bench.json_lines(log) == [{"pl": 1, "speed_tg": 250.5}, {"pl": 8, "speed_tg": 510.0}]


def test_serving_summary_counts_failures_and_their_errors(bench) -> None:
    run = {"output_throughput": 100.0, "mean_ttft_ms": 20.0, "mean_tpot_ms": 9.0, "completed": 7, "failed": 1,
           "errors": ["", "Traceback ...\naiohttp.client_exceptions.ServerDisconnectedError: Server disconnected"]}
    clean = {**run, "output_throughput": 120.0, "completed": 8, "failed": 0, "errors": ["", ""]}
    summary = bench.ServingSummary.of([run, clean, clean])
    assert (summary.completed, summary.failed) == (23, 1)
    assert summary.output_tps.median == 120.0 and summary.output_tps.low == 100.0
    assert summary.errors == {"aiohttp.client_exceptions.ServerDisconnectedError: Server disconnected": 1}
