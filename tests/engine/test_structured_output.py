"""Structured outputs in the engine: the tiny model has random weights, so every valid output is the grammar's doing.

A one-layer variant of the tiny preset (the real 129280-token vocabulary and tokenizer) keeps the CPU steps cheap.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

from dsv32 import LLM, SamplingParams
from dsv32.config import tiny_config
from dsv32.engine.request import TokenSequence
from dsv32.engine.sampling_params import StructuredOutputsParams
from dsv32.engine.structured_output import bound_structural_tag_whitespace, choice_grammar
from tests.engine.conftest import make_engine

SCHEMAS: list[dict] = [
    {"type": "boolean"},
    {"type": "integer", "minimum": -5, "maximum": 5},
    {"enum": ["red", "green", "blue"]},
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
    {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99}}, "required": ["n"]},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 4}, "age": {"type": "integer",
     "minimum": 0, "maximum": 120}}, "required": ["name", "age"]},
    {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 1, "maxItems": 3},
    {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"x": {"type": "boolean"}},
     "required": ["x"]}}, "required": ["inner"]},
    {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}}, "required": ["a"]},
    {"anyOf": [{"type": "boolean"}, {"type": "null"}]},
    {"type": "object", "properties": {"v": {"anyOf": [{"type": "integer", "minimum": 0, "maximum": 3},
     {"enum": ["none"]}]}}, "required": ["v"]},
    {"type": "string", "pattern": "^[a-c]{2}$"},
    {"type": "object", "properties": {"level": {"enum": [1, 2, 3]}, "tag": {"const": "x"}},
     "required": ["level", "tag"]},
    {"type": "array", "prefixItems": [{"type": "boolean"}, {"enum": ["p", "q"]}], "items": False},
    {"type": "object", "properties": {"pts": {"type": "array", "items": {"type": "object", "properties":
     {"x": {"type": "integer", "minimum": 0, "maximum": 9}}, "required": ["x"]}, "maxItems": 2}},
     "required": ["pts"]},
    {"type": "number", "minimum": 0, "maximum": 1},
    {"type": "object", "properties": {"s": {"type": "string", "minLength": 1, "maxLength": 2}}, "required": ["s"],
     "additionalProperties": False},
    {"$defs": {"flag": {"type": "boolean"}}, "type": "object", "properties": {"f": {"$ref": "#/$defs/flag"},
     "g": {"$ref": "#/$defs/flag"}}, "required": ["f", "g"]},
    {"type": "object", "properties": {"kind": {"enum": ["a", "b"]}, "count": {"type": "integer", "exclusiveMinimum":
     0, "maximum": 4}, "opt": {"type": "boolean"}}, "required": ["kind", "count"]},
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return make_engine("grammar", model_config=tiny_config().with_overrides(num_hidden_layers=1),
                       max_num_seqs=len(SCHEMAS), max_num_batched_tokens=512)


def _constrained(max_tokens: int, seed: int, **spec) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, seed=seed, structured_outputs=StructuredOutputsParams(**spec))


def _accepts_prefix(llm: LLM, spec: StructuredOutputsParams, token_ids: list[int]) -> bool:
    backend = llm.engine.structured_output.backend
    matcher = backend.new_matcher(backend.compile(spec))
    return all(matcher.accept_token(token_id) for token_id in token_ids)


def test_json_schemas_are_followed(llm: LLM) -> None:
    assert len(SCHEMAS) == 20
    params = [_constrained(48, seed, json=schema) for seed, schema in enumerate(SCHEMAS)]
    outputs = llm.generate(["Reply in JSON."] * len(SCHEMAS), params, use_tqdm=False)
    added = set(llm.get_tokenizer().added_token_ids)
    stopped = 0
    for schema, param, out in zip(SCHEMAS, params, outputs, strict=True):
        completion = out.outputs[0]
        assert not added & set(completion.token_ids), "a grammar let a chat control token through"
        if completion.finish_reason == "stop":
            stopped += 1
            jsonschema.validate(json.loads(completion.text), schema)
        else:
            assert completion.finish_reason == "length"
            assert _accepts_prefix(llm, param.structured_outputs, completion.token_ids), completion.text
    assert stopped >= 15  # the schemas are bounded: a random model mostly completes them


def test_regex_choice_and_json_object(llm: LLM) -> None:
    regex = r"[a-z]{2,4}-\d{2}"
    choices = ["yes", "no", "it depends"]
    params = [_constrained(16, seed, regex=regex) for seed in range(3)]
    params += [_constrained(16, seed, choice=choices) for seed in range(3)]
    params += [_constrained(24, seed, json_object=True) for seed in range(2)]
    outputs = [out.outputs[0] for out in llm.generate(["x"] * len(params), params, use_tqdm=False)]
    for completion in outputs[:3]:
        assert completion.finish_reason == "stop" and re.fullmatch(regex, completion.text), completion.text
    for completion in outputs[3:6]:
        assert completion.finish_reason == "stop" and completion.text in choices
    for completion, param in zip(outputs[6:], params[6:], strict=True):
        if completion.finish_reason == "stop":
            assert isinstance(json.loads(completion.text), dict)
        else:
            assert _accepts_prefix(llm, param.structured_outputs, completion.token_ids)


def test_a_completed_grammar_ends_the_output_even_before_min_tokens(llm: LLM) -> None:
    out = llm.generate(["x"], _constrained(16, 0, choice=["done"]), use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason) == ("done", "stop")
    params = SamplingParams(max_tokens=16, min_tokens=8, ignore_eos=True,
                            structured_outputs=StructuredOutputsParams(choice=["ok"]))
    out = llm.generate(["x"], params, use_tqdm=False)[0].outputs[0]
    assert (out.text, out.finish_reason) == ("ok", "stop")


def test_unconstrained_rows_in_a_mixed_batch_are_untouched(llm: LLM) -> None:
    free = SamplingParams(max_tokens=8, temperature=0.0)
    alone = llm.generate(["free text"], free, use_tqdm=False)[0].outputs[0].token_ids
    mixed = llm.generate(["free text", "x", "free text"], [free, _constrained(8, 0, regex="[0-9]{8}"), free],
                         use_tqdm=False)
    assert mixed[0].outputs[0].token_ids == alone == mixed[2].outputs[0].token_ids
    assert re.fullmatch("[0-9]+", mixed[1].outputs[0].text)


def test_thinking_stays_free_until_think_end(llm: LLM) -> None:
    """A prompt ending in <think>: the grammar starts after </think> (a strong bias makes the model close its
    thinking after a few free tokens)."""
    tokenizer = llm.get_tokenizer()
    prompt = {"prompt_token_ids": tokenizer.encode("<｜begin▁of▁sentence｜><｜User｜>hi<｜Assistant｜><think>")}
    params = [SamplingParams(max_tokens=40, seed=seed, logit_bias={tokenizer.think_end_id: 12.0},
                             structured_outputs=StructuredOutputsParams(choice=["alpha", "beta"]))
              for seed in range(4)]
    outputs = [out.outputs[0] for out in llm.generate([prompt] * len(params), params, use_tqdm=False)]
    free_tokens = 0
    for completion in outputs:
        ids = completion.token_ids
        assert tokenizer.think_end_id in ids, "the bias should end the thinking within 40 tokens"
        end = ids.index(tokenizer.think_end_id)
        free_tokens += end
        answer = tokenizer.decode(ids[end + 1:])
        assert completion.finish_reason == "stop" and answer in ("alpha", "beta"), completion.text
    assert free_tokens > 0, "the thinking part was constrained"


def test_bad_specs_are_value_errors_naming_the_problem(llm: LLM) -> None:
    manager = llm.engine.structured_output
    cases = [
        ({"regex": "a(b"}, "parenthesis"),
        ({"json": {"type": "objekt"}}, "objekt"),
        ({"json": {"type": "array", "items": {"type": "integer"}, "uniqueItems": True}}, "#/uniqueItems"),
        ({"json": {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}}, "#/properties/a/not"),
        ({"json": "{not json"}, "not valid JSON"),
        ({"grammar": "root ::= missing_rule"}, "missing_rule"),
        ({"structural_tag": '{"type": "structural_tag", "format": {"type": "bogus"}}'}, "bogus"),
    ]
    for spec, needle in cases:
        with pytest.raises(ValueError, match=re.escape(needle)):
            manager.validate(SamplingParams(structured_outputs=StructuredOutputsParams(**spec)))
    with pytest.raises(ValueError, match="exactly one constraint"):
        StructuredOutputsParams(regex="a", choice=["a"])
    with pytest.raises(ValueError, match="non-empty list"):
        StructuredOutputsParams(choice=[])


def test_matcher_accept_and_rollback(llm: LLM) -> None:
    """What speculative decoding needs: accept draft tokens, roll back the rejected ones."""
    manager = llm.engine.structured_output
    tokenizer = llm.get_tokenizer()
    spec = StructuredOutputsParams(choice=["abc", "abd"])
    seq = TokenSequence("r", 0, [5, 6], SamplingParams(structured_outputs=spec), max_tokens=8)
    manager.add(seq)
    manager.compile(spec).result()
    assert manager.poll() == [] and manager.is_ready(seq)
    a, b, c, d = (tokenizer.encode(ch)[0] for ch in "abcd")
    try:
        assert not manager.accept(seq, a) and not manager.accept(seq, b)
        assert manager.accept(seq, c)  # "abc" is complete: the output must end
        manager.rollback(seq, 1)
        with pytest.raises(ValueError, match="does not follow"):
            manager.accept(seq, a)
        assert manager.accept(seq, d)
    finally:
        manager.remove(seq)


def test_compiled_grammars_are_cached(llm: LLM) -> None:
    manager = llm.engine.structured_output
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    first = manager.compile(StructuredOutputsParams(json=schema))
    again = manager.compile(StructuredOutputsParams(json=json.dumps(dict(reversed(schema.items())))))
    assert first is again


def test_spec_helpers() -> None:
    assert choice_grammar(['a"b', "c"]) == 'root ::= "a\\"b" | "c"'
    legacy = {"type": "structural_tag", "structures": [{"begin": "<f>", "schema": {"type": "object"}, "end": "</f>"}],
              "triggers": ["<f"]}
    bounded = bound_structural_tag_whitespace(legacy, 7)
    tag = bounded["format"]["tags"][0]
    assert bounded["format"]["triggers"] == ["<f"]
    assert tag["content"] == {"type": "json_schema", "json_schema": {"type": "object"}, "max_whitespace_cnt": 7}
