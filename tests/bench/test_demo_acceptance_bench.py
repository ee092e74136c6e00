"""benchmarks/demo_acceptance.py's pure parts: reading the speculative-decoding counters and judging the criteria."""

from __future__ import annotations

from dsv32.eval.demo import Record, arithmetic_cases, tools_cases
from tests.benchmark_scripts import benchmark_module

METRICS = """# HELP vllm:spec_decode_num_draft_tokens_total Number of draft tokens.
# TYPE vllm:spec_decode_num_draft_tokens_total counter
vllm:spec_decode_num_draft_tokens_total{engine="0",model_name="demo"} 120.0
vllm:spec_decode_num_accepted_tokens_total{engine="0",model_name="demo"} 45.0
vllm:spec_decode_num_accepted_tokens_per_pos_total{engine="0",model_name="demo",position="0"} 45.0
vllm:spec_decode_num_drafts_total{engine="0",model_name="demo"} 120.0
"""


def test_spec_decode_counts_reads_the_totals_not_the_per_position_ones() -> None:
    with benchmark_module("demo_acceptance.py") as bench:
        assert bench.spec_decode_counts(METRICS) == (45.0, 120.0)
        assert bench.spec_decode_counts("") == (0.0, 0.0)


def _records(cases: list, right: int) -> list[Record]:
    return [Record(case, {}, {"content": "x", "tool_calls": []}, "stop", 1, 1, {"correct": i < right})
            for i, case in enumerate(cases)]


def test_the_report_passes_only_when_every_criterion_does() -> None:
    arithmetic, tools = arithmetic_cases(10, 0), tools_cases(5, 0)
    with benchmark_module("demo_acceptance.py") as bench:
        text, passed = bench.report("run", 90.0, _records(arithmetic, 8), _records(tools, 4), 36, 120)
        assert passed and "8 of 10" in text and "36 / 120 = 0.30" in text
        for failing in ((250.0, 8, 4, 36), (90.0, 7, 4, 36), (90.0, 8, 3, 36), (90.0, 8, 4, 35)):
            ready, sums, calls, accepted = failing
            _, passed = bench.report("run", ready, _records(arithmetic, sums), _records(tools, calls), accepted, 120)
            assert not passed, failing
