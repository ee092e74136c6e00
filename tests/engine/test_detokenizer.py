"""Incremental detokenization (never splits a character, adds up to a full decode) and stop-string matching."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dsv32.engine.detokenizer import (
    REPLACEMENT_CHAR,
    IncrementalDetokenizer,
    StopChecker,
    StopMatch,
    find_stop_string,
    stop_prefix_length,
)
from dsv32.tokenizer import Tokenizer

MODEL_VOCAB_SIZE = 129280
MULTIBYTE_TEXT = "中文 😀 🎉 ünïcödé 日本語のテキスト 한국어 👨‍👩‍👧 Ωμέγα ∑∫ 🇫🇷 "
SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(None)


def split_into_chunks(ids: list[int], sizes: list[int]) -> list[list[int]]:
    """Cut ``ids`` into consecutive chunks of the given sizes (cycled), as a multi-token step would deliver them."""
    chunks, position, index = [], 0, 0
    while position < len(ids):
        size = sizes[index % len(sizes)]
        chunks.append(ids[position:position + size])
        position += size
        index += 1
    return chunks


def detokenize(tok: Tokenizer, prompt: list[int], chunks: list[list[int]], skip_special_tokens: bool = True
               ) -> tuple[list[str], str]:
    detokenizer = IncrementalDetokenizer(tok, prompt, skip_special_tokens=skip_special_tokens)
    deltas = [detokenizer.step(chunk) for chunk in chunks]
    return deltas, detokenizer.finish()


def test_character_split_across_tokens_is_held_until_complete(tok: Tokenizer) -> None:
    ids = tok.encode(" 😀!")
    assert tok.decode(ids[:1]).endswith(REPLACEMENT_CHAR)  # the emoji's bytes really are split
    deltas, rest = detokenize(tok, [], [[token] for token in ids])
    assert deltas[0] == ""
    assert "".join(deltas) == " 😀!" and rest == ""


def test_finish_flushes_an_unfinished_character(tok: Tokenizer) -> None:
    ids = tok.encode(" 😀")
    deltas, rest = detokenize(tok, [], [ids[:1]])
    assert deltas == [""]
    assert rest == tok.decode(ids[:1]) and rest.endswith(REPLACEMENT_CHAR)


def test_special_tokens_skipped_or_kept(tok: Tokenizer) -> None:
    ids = tok.encode("Hi<think>x<｜end▁of▁sentence｜>")
    skipped, _ = detokenize(tok, [0], [[token] for token in ids])
    kept, _ = detokenize(tok, [0], [[token] for token in ids], skip_special_tokens=False)
    assert "".join(skipped) == "Hi<think>x"
    assert "".join(kept) == "Hi<think>x<｜end▁of▁sentence｜>"


def test_prompt_ending_mid_character_is_not_glued_to_the_output(tok: Tokenizer) -> None:
    ids = tok.encode(" 😀 ok")
    prompt, output = ids[:1], ids[1:]
    deltas, rest = detokenize(tok, prompt, [output])
    assert "".join(deltas) + rest == tok.decode(output)


@SETTINGS
@given(
    text=st.text(alphabet=st.sampled_from(MULTIBYTE_TEXT + "abc 12"), max_size=40),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
)
def test_valid_text_streams_without_replacement_chars(tok: Tokenizer, text: str, sizes: list[int]) -> None:
    ids = tok.encode(text)
    deltas, rest = detokenize(tok, tok.encode("<｜Assistant｜>"), split_into_chunks(ids, sizes))
    assert all(REPLACEMENT_CHAR not in delta for delta in deltas)
    assert "".join(deltas) == text and rest == ""


@SETTINGS
@given(
    pool_picks=st.lists(st.integers(0, 10_000), max_size=30),
    random_ids=st.lists(st.integers(0, MODEL_VOCAB_SIZE - 1), max_size=10),
    prompt=st.lists(st.integers(0, MODEL_VOCAB_SIZE - 1), max_size=8),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
    skip_special_tokens=st.booleans(),
    data=st.randoms(use_true_random=False),
)
def test_deltas_add_up_to_full_decode_for_any_ids(tok: Tokenizer, pool_picks: list[int], random_ids: list[int],
                                                  prompt: list[int], sizes: list[int], skip_special_tokens: bool,
                                                  data) -> None:
    # Byte-level pieces of multi-byte characters, special/think tokens and ids beyond the tokenizer's vocabulary,
    # mixed with arbitrary ids, in any order: invalid UTF-8 included.
    pool = tok.encode(MULTIBYTE_TEXT) + [0, 1, tok.think_start_id, tok.think_end_id, 128900, MODEL_VOCAB_SIZE - 1]
    ids = [pool[pick % len(pool)] for pick in pool_picks] + random_ids
    data.shuffle(ids)
    deltas, rest = detokenize(tok, prompt, split_into_chunks(ids, sizes), skip_special_tokens)
    assert "".join(deltas) + rest == tok.decode(ids, skip_special_tokens=skip_special_tokens)


def test_find_stop_string_only_looks_at_matches_ending_in_new_text() -> None:
    assert find_stop_string("stop here", 4, ["stop"]) is None  # "stop" was already checked before
    assert find_stop_string("stop here", 6, ["stop"]) == StopMatch("stop", "")
    assert find_stop_string("abc", 0, ["abc"]) is None


def test_stop_string_at_the_very_start() -> None:
    checker = StopChecker(["Hello"])
    assert checker.append("Hello world") == "Hello"
    assert checker.text == "" and checker.stream_delta() == ""


def test_overlapping_candidates_first_to_end_wins() -> None:
    # Generated one character at a time, "bc" completes before "abcd" does; arriving in one chunk must agree.
    assert find_stop_string("xabcd", 5, ["abcd", "bc"]) == StopMatch("bc", "xa")
    # Same end: the longer (earlier-starting) one is reported.
    assert find_stop_string("xabc", 4, ["bc", "abc"]) == StopMatch("abc", "x")
    assert find_stop_string("xabc", 4, ["bc", "abc"], include_stop_str_in_output=True) == StopMatch("abc", "xabc")


def test_include_stop_str_in_output_keeps_stop_but_cuts_what_follows() -> None:
    checker = StopChecker(["world"], include_stop_str_in_output=True)
    assert checker.append("Hello wor") is None
    assert checker.stream_delta() == "Hello wor"  # nothing withheld: the stop string may be shown
    assert checker.append("ld, bye") == "world"
    assert checker.text == "Hello world"
    assert checker.stream_delta() == "ld"


def test_stop_prefix_length() -> None:
    assert stop_prefix_length("answer 4 Que", ["Question"]) == 3
    assert stop_prefix_length("answer 4 Q", ["Question", "4 Q!"]) == 3
    assert stop_prefix_length("answer 4", ["Question"]) == 0
    assert stop_prefix_length("Question", ["Question"]) == 0  # a whole stop string is a match, not a prefix


def test_streaming_withholds_a_possible_stop_start_and_releases_it_otherwise() -> None:
    checker = StopChecker(["Question"])
    checker.append("answer 4 Que")
    assert checker.stream_delta() == "answer 4 "
    checker.append("en")
    assert checker.stream_delta() == "Queen"
    checker.append(" Ques")
    assert checker.stream_delta() == " "
    assert checker.append("tion 2") == "Question"
    assert checker.text == "answer 4 Queen "
    assert checker.stream_delta() == ""
    with pytest.raises(RuntimeError, match="already stopped"):
        checker.append("more")


def test_finished_stream_flushes_the_withheld_tail() -> None:
    checker = StopChecker(["Question"])
    checker.append("the end: Q")
    assert checker.stream_delta() == "the end: "
    assert checker.stream_delta(finished=True) == "Q"


def test_empty_stop_string_is_rejected() -> None:
    with pytest.raises(ValueError, match="non-empty"):
        StopChecker(["ok", ""])


def test_stop_string_split_across_tokens(tok: Tokenizer) -> None:
    text = "The answer is 42.\nQuestion: what next?"
    ids = tok.encode(text)
    detokenizer = IncrementalDetokenizer(tok, [0], skip_special_tokens=True)
    checker = StopChecker(["\nQuestion:"])
    streamed, stop = "", None
    for token in ids:
        stop = checker.append(detokenizer.step([token]))
        streamed += checker.stream_delta()
        assert "\nQ" not in streamed
        if stop:
            break
    assert stop == "\nQuestion:"
    assert checker.text == streamed == "The answer is 42."


@SETTINGS
@given(
    text=st.text(alphabet="abc", max_size=30),
    stops=st.lists(st.text(alphabet="abc", min_size=1, max_size=4), min_size=1, max_size=3),
    sizes=st.lists(st.integers(1, 5), min_size=1, max_size=4),
    include=st.booleans(),
)
def test_stop_result_does_not_depend_on_chunking_and_never_leaks(text: str, stops: list[str], sizes: list[int],
                                                                 include: bool) -> None:
    def run(chunks: list[str]) -> tuple[str, str | None, str]:
        checker = StopChecker(stops, include_stop_str_in_output=include)
        streamed = ""
        for chunk in chunks:
            stopped = checker.append(chunk)
            streamed += checker.stream_delta()
            if not include:
                assert not any(stop in streamed for stop in stops)
            if stopped:
                break
        streamed += checker.stream_delta(finished=True)
        return checker.text, checker.stopped_by, streamed

    chunks = ["".join(chunk) for chunk in split_into_chunks(list(text), sizes)]
    final_text, stopped_by, streamed = run(chunks)
    assert (final_text, stopped_by, streamed) == run(list(text))
    assert streamed == final_text
    if stopped_by is None:
        assert final_text == text
    else:
        assert text.startswith(final_text)
        assert final_text.endswith(stopped_by) if include else text[len(final_text):].startswith(stopped_by)
