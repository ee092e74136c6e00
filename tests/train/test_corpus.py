"""The demo corpus: rendered byte-exact by our encoder as the server prompts, trained spans parse back to the
messages they came from, held-out items never reach training."""

from __future__ import annotations

import json

import pytest

from dsv32.encoding.encode import encode_messages, thinking_mode_for_prompt
from dsv32.encoding.parse import parse_message_from_completion_text
from dsv32.encoding.requests import prepare_chat_request
from dsv32.tokenizer import Tokenizer
from dsv32.train.corpus import (
    CALCULATOR,
    GET_WEATHER,
    HELD_OUT_CITIES,
    TASKS,
    examples,
    held_out_pair,
    render,
)
from dsv32.train.demo import copied_name_ids, tokenize

EXAMPLES = list(examples(400, seed=7))


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained(None)


def test_every_task_is_drawn_and_the_corpus_is_reproducible() -> None:
    assert {ex.task for ex in EXAMPLES} == set(TASKS)
    again = list(examples(400, seed=7))
    assert [render(a).text for a in EXAMPLES] == [render(b).text for b in again]
    assert [render(a).text for a in examples(20, seed=8)] != [render(b).text for b in EXAMPLES[:20]]


def test_rendering_is_the_servers_prompt_then_the_encoders_replies() -> None:
    for ex in EXAMPLES:
        rendered = render(ex)
        encoding = prepare_chat_request(**ex.request)
        assert rendered.prompt == encoding.prompt
        full = encode_messages(encoding.messages + ex.replies, encoding.thinking_mode, drop_thinking=False)
        assert rendered.text == full
        assert rendered.segments[-1][1] and rendered.text.endswith("<｜end▁of▁sentence｜>")


def test_trained_spans_parse_back_to_the_replies() -> None:
    """Each trained span is what the model writes after its prompt; DeepSeek's parser recovers the message."""
    for ex in EXAMPLES:
        rendered = render(ex)
        encoding = prepare_chat_request(**ex.request)
        assistant = [m for m in ex.replies if m["role"] == "assistant"]
        prompt = ""
        spans = []
        for text, trained in rendered.segments:
            if trained:
                spans.append((prompt, text))
            prompt += text
        assert len(spans) == len(assistant)
        for (before, span), message in zip(spans, assistant, strict=True):
            mode = thinking_mode_for_prompt(before)
            parsed = parse_message_from_completion_text(span.removesuffix("<｜end▁of▁sentence｜>"), mode,
                                                        encoding.tools or None)
            assert parsed["content"] == message["content"]
            assert parsed["reasoning_content"] == message.get("reasoning_content", "")
            calls = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed["tool_calls"]]
            wanted = [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                      for c in message.get("tool_calls", [])]
            assert calls == wanted


def test_tool_examples_cover_the_acceptance_tools_several_calls_and_tool_choice_none() -> None:
    tool_examples = [ex for ex in EXAMPLES if ex.task == "tools"]
    assert any(ex.request.get("tools") == [GET_WEATHER, CALCULATOR] for ex in tool_examples)
    assert any(len(ex.replies[0].get("tool_calls", [])) >= 2 for ex in tool_examples)
    none = [ex for ex in tool_examples if ex.request.get("tool_choice") == "none"]
    assert none and all("<｜DSML｜" not in render(ex).text for ex in none)
    weather = [ex for ex in tool_examples if ex.expected.get("tool_call", {}).get("name") == "get_weather"]
    assert weather and all(ex.expected["tool_call"]["arguments"]["city"] in ex.request["messages"][0]["content"]
                           for ex in weather)


def test_held_out_operands_and_cities_stay_out_of_training() -> None:
    train_texts = [render(ex).text for ex in examples(600, seed=3, tasks=("arithmetic", "tools"))]
    assert not any(city in text for city in HELD_OUT_CITIES for text in train_texts)
    for ex in examples(300, seed=3, tasks=("arithmetic",)):
        question = ex.request["messages"][0]["content"]
        numbers = [int(w.strip("?.")) for w in question.split() if w.strip("?.").isdigit()]
        if len(numbers) == 2 and all(10 <= n <= 99 for n in numbers) and "*" not in question:
            assert not held_out_pair(*numbers)
    heldout = list(examples(200, seed=3, split="heldout", tasks=("arithmetic", "tools")))
    weather = [ex.expected["tool_call"]["arguments"]["city"] for ex in heldout
               if ex.expected.get("tool_call", {}).get("name") == "get_weather"]
    assert weather and set(weather) <= set(HELD_OUT_CITIES)


def test_unknown_split_or_task_is_refused() -> None:
    with pytest.raises(ValueError, match="split"):
        next(examples(1, split="test"))
    with pytest.raises(ValueError, match="unknown task"):
        next(examples(1, tasks=("poetry",)))


def test_tokenization_is_the_texts_and_copies_names_as_the_prompt_spells_them(tokenizer: Tokenizer) -> None:
    copied = 0
    for ex in EXAMPLES[:150]:
        sequence = tokenize(ex, tokenizer)
        text = render(ex).text
        assert tokenizer.decode(sequence.ids, skip_special_tokens=False) == text
        assert any(sequence.trained) and not sequence.trained[0]
        if not ex.copied:
            assert sequence.ids == tokenizer.encode(text)
        for name in ex.copied:
            spaced = tokenizer.encode(" " + name)
            written = copied_name_ids(name, tokenizer)
            assert tokenizer.decode(written) == name
            assert written[len(written) - len(spaced) + 1:] == spaced[1:]  # all but the first piece: the prompt's
            assert any(sequence.ids[i:i + len(written)] == written for i in range(len(sequence.ids)))
            copied += 1
    assert copied > 10
