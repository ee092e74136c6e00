"""``benchmarks/offline_throughput.py``'s check of the peer: HF's rates beside the peers' README figures, flagged
when far below them (a handicapped peer makes the comparison meaningless)."""

from __future__ import annotations

import argparse
import pathlib

import pytest

from tests.benchmark_scripts import benchmark_module

README = """## Figures seen here
| peer, checkpoint | B=1 prefill tok/s | B=1 decode tok/s | B=8 prefill tok/s | B=8 decode tok/s |
|---|---|---|---|---|
| HF, V3 bf16 (hidden 256) | 8774 | 98.5 | 32603 | 554 |
| HF, V3.2 bf16 | 7141 | 86.5 | 23253 | 496 |
"""


@pytest.fixture(scope="module")
def bench():
    with benchmark_module("offline_throughput.py") as module:
        yield module


def test_reads_the_v32_row_of_the_peers_readme(bench, tmp_path: pathlib.Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert bench.reference_figures(str(readme)) == {"b1_prefill": 7141, "b1_decode": 86.5, "b8_prefill": 23253,
                                                    "b8_decode": 496}
    assert bench.reference_figures(str(tmp_path / "missing.md")) is None


def test_flags_a_peer_far_below_its_reference(bench) -> None:
    args = argparse.Namespace(batch_sizes=[1, 8, 16], input_len=128, output_len=64)
    reference = {"b1_prefill": 7000.0, "b1_decode": 90.0, "b8_prefill": 23000.0, "b8_decode": 500.0}
    # batch 1: 128 prompt tokens in 20 ms (6400 tok/s), 63 more tokens in 0.7 s (90 tok/s): as the reference;
    # batch 8: prefill as the reference, decode 8 * 63 tokens in 5.04 s (100 tok/s): a fifth of it.
    hf = {"1": {"prefill_seconds": 0.02, "seconds": 0.72}, "8": {"prefill_seconds": 1024 / 23000,
                                                                 "seconds": 1024 / 23000 + 5.04}}
    lines = bench.peer_check(hf, args, reference)
    assert len(lines) == 4
    assert all("ok" in line for line in lines[:3])
    assert "BROKEN COMPARISON" in lines[3] and "decode" in lines[3]
    assert "unchecked" in bench.peer_check(hf, args, None)[0]
    noisy = {"1": {"prefill_seconds": 0.5, "seconds": 0.4}}  # the full run timed faster than its prefill alone
    lines = bench.peer_check(noisy, argparse.Namespace(batch_sizes=[1], input_len=128, output_len=64), reference)
    assert "not measurable" in lines[1] and "BROKEN" in lines[0]
