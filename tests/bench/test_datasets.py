"""Benchmark datasets: random prompts of an exact DeepSeek token length, ShareGPT parsing and vLLM's filters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsv32.bench.datasets import TokenCounter, sample_random_requests, sample_sharegpt_requests


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    return TokenCounter.load()


def test_random_prompts_have_exact_token_lengths(counter: TokenCounter) -> None:
    requests = sample_random_requests(counter, 12, input_len=100, output_len=20, range_ratio=0.5, seed=3)
    assert len(requests) == 12
    for request in requests:
        assert counter.count(request.prompt) == request.prompt_len
        assert 50 <= request.prompt_len <= 150
        assert 10 <= request.expected_output_len <= 30
    assert len({r.prompt_len for r in requests}) > 1


def test_random_prompts_fixed_length_and_seeded(counter: TokenCounter) -> None:
    first = sample_random_requests(counter, 3, input_len=128, output_len=32, seed=7)
    again = sample_random_requests(counter, 3, input_len=128, output_len=32, seed=7)
    other = sample_random_requests(counter, 3, input_len=128, output_len=32, seed=8)
    assert first == again
    assert first != other
    assert [(r.prompt_len, r.expected_output_len) for r in first] == [(128, 32)] * 3


def test_random_rejects_bad_ratio(counter: TokenCounter) -> None:
    with pytest.raises(ValueError, match="range-ratio"):
        sample_random_requests(counter, 1, 10, 10, range_ratio=1.5)


def write_sharegpt(path: Path) -> None:
    long_reply = " ".join(["word"] * 30)
    conversations = [
        {
            "id": "ok",
            "conversations": [
                {"from": "human", "value": "Tell me about the sea, please."},
                {"from": "gpt", "value": long_reply},
            ],
        },
        {
            "id": "short-reply",
            "conversations": [
                {"from": "human", "value": "What is two plus two, exactly?"},
                {"from": "gpt", "value": "4"},
            ],
        },
        {"id": "short", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello!"}]},
        {"id": "one-turn", "conversations": [{"from": "human", "value": "Anyone there at all, friends?"}]},
        {"id": "too-long", "conversations": [{"from": "human", "value": " x" * 1100}, {"from": "gpt", "value": "ok"}]},
    ]
    path.write_text(json.dumps(conversations))


def test_sharegpt_keeps_valid_first_turns(tmp_path: Path, counter: TokenCounter) -> None:
    path = tmp_path / "sharegpt.json"
    write_sharegpt(path)
    [request] = sample_sharegpt_requests(counter, 1, str(path))
    assert request.prompt == "Tell me about the sea, please."
    assert request.prompt_len == counter.count(request.prompt)
    assert request.expected_output_len == counter.count(" ".join(["word"] * 30))
    with pytest.raises(ValueError, match="only 1 usable"):
        sample_sharegpt_requests(counter, 2, str(path))


def test_sharegpt_fixed_output_len_skips_only_the_output_minimum(tmp_path: Path, counter: TokenCounter) -> None:
    path = tmp_path / "sharegpt.json"
    write_sharegpt(path)
    requests = sample_sharegpt_requests(counter, 2, str(path), output_len=64)
    # The one-token reply no longer matters; "Hi" stays out (prompt under 4 tokens), as does the 1100-token prompt.
    assert sorted(r.prompt for r in requests) == ["Tell me about the sea, please.", "What is two plus two, exactly?"]
    assert {r.expected_output_len for r in requests} == {64}


def test_sharegpt_bad_file(tmp_path: Path, counter: TokenCounter) -> None:
    path = tmp_path / "bad.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not ShareGPT JSON"):
        sample_sharegpt_requests(counter, 1, str(path))
