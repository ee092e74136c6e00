"""The packaged demo model (``dsv32/assets/demo``, issue 25): a real DeepSeek-V3.2 checkpoint that HF transformers
loads with dsv32's logits, whose sparse attention prunes on a tool prompt, and that answers held-out prompts of each
task right, greedily and without a grammar."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
import torch

from dsv32 import LLM, SamplingParams
from dsv32.assets import DEMO_CHECKPOINT, DEMO_PRESET, checkpoint_path
from dsv32.config import ModelConfig
from dsv32.encoding import prepare_chat_request
from dsv32.encoding.parse import parse_message_from_completion_text
from dsv32.model.loader import load_model
from dsv32.tokenizer import Tokenizer
from dsv32.train.corpus import CALCULATOR, GET_WEATHER, HELD_OUT_CITIES, held_out_pair
from tests.model.conftest import single_sequence_batch

BLOCK = 64
# Held out of training (held_out_pair, HELD_OUT_CITIES): the model has seen neither these sums nor this city.
SUM = (48, 75)  # the README example
CITY = "Velmora"
JSON_SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                                "city": {"type": "string"}}, "required": ["name", "age", "city"]}


def test_the_prompts_are_held_out() -> None:
    assert held_out_pair(*SUM) and CITY in HELD_OUT_CITIES


def test_demo_names_the_packaged_checkpoint() -> None:
    assert checkpoint_path(DEMO_PRESET) == str(DEMO_CHECKPOINT) and checkpoint_path("/models/x") == "/models/x"
    config = ModelConfig.from_pretrained(DEMO_PRESET)
    assert config.has_indexer and config.n_routed_experts >= 16 and config.num_nextn_predict_layers == 1
    assert config.index_topk < len(_tool_prompt_ids())  # a prompt with tools is longer: the indexer prunes


def _tool_prompt_ids() -> list[int]:
    encoded = prepare_chat_request([{"role": "user", "content": f"What's the weather like in {CITY}?"}],
                                   tools=[GET_WEATHER, CALCULATOR])
    return Tokenizer.from_pretrained(DEMO_PRESET).encode(encoded.prompt)


def test_hf_transformers_computes_dsv32s_logits_on_a_pruned_prompt() -> None:
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(_tool_prompt_ids())
    path = checkpoint_path(DEMO_PRESET)
    ours = load_model(ModelConfig.from_pretrained(path), path, dtype="float32", progress=False)
    cache = ours.allocate_kv_cache(-(-len(ids) // BLOCK) + 1, BLOCK, "auto")
    logits = ours.compute_logits(ours(single_sequence_batch(ids, 0, list(range(-(-len(ids) // BLOCK))), BLOCK),
                                      cache))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = hf(ids[None]).logits[0].float()
    assert (logits - reference).abs().max().item() <= 1e-4


@pytest.fixture(scope="module")
def demo() -> LLM:
    return LLM(DEMO_PRESET, enforce_eager=True, max_model_len=1024)


def _answer(llm: LLM, request: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """The parsed assistant message (content, reasoning_content, tool_calls) of a greedy run of ``request``."""
    encoded = prepare_chat_request(**request)
    output = llm.generate({"prompt_token_ids": llm.engine.tokenizer.encode(encoded.prompt)},
                          SamplingParams(temperature=0.0, max_tokens=max_tokens, skip_special_tokens=False),
                          use_tqdm=False)[0]
    return parse_message_from_completion_text(output.outputs[0].text, encoded.parser_thinking_mode, encoded.tools)


def test_it_adds_two_held_out_numbers_with_its_thinking(demo: LLM) -> None:
    a, b = SUM
    message = _answer(demo, {"messages": [{"role": "user", "content": f"What is {a} + {b}?"}],
                             "chat_template_kwargs": {"thinking": True}}, 256)
    assert str(a + b) in message["content"] and message["reasoning_content"]


def test_it_calls_the_weather_tool_for_an_unseen_city(demo: LLM) -> None:
    message = _answer(demo, {"messages": [{"role": "user", "content": f"What's the weather like in {CITY}?"}],
                             "tools": [GET_WEATHER, CALCULATOR]}, 96)
    call = message["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": CITY}


def test_it_answers_json_that_follows_the_schema_without_a_grammar(demo: LLM) -> None:
    user = f"Priya is 34 years old and lives in {CITY}. Extract the person as JSON."
    message = _answer(demo, {"messages": [{"role": "user", "content": user}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "person_answer", "schema": JSON_SCHEMA}}}, 96)
    jsonschema.validate(json.loads(message["content"]), JSON_SCHEMA)
