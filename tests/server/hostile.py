"""Hostile request bodies for the OpenAI-compatible server, and the contract every answer to one must keep.

Shared by tests/server/test_adversarial.py (each family against a real `dsv32 serve`) and benchmarks/fuzz_soak.py
(drawn at random into a long mixed load). Pure Python (no pytest, no dsv32 imports): a body is built as JSON text,
so it can hold what ``json.dumps`` will not write (``1e999``, 5000 levels of nesting, duplicate keys) and lone
surrogates travel as the JSON escape ``"\\ud800"`` (``ensure_ascii``), exactly as a hostile client sends them.

The contract (``contract_violation``): the answer is 2xx or 4xx, never 5xx; a 4xx carries OpenAI's error envelope
``{"error": {"message", "type", "param", "code"}}``; it comes within the case's time limit; an input the server must
refuse (a lone surrogate, a non-finite number, a malformed structured-output spec, ...) gets a 4xx (a 400 naming the
field where the case says which).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
TOKENIZE = "/tokenize"
DETOKENIZE = "/detokenize"

# Small generations only: hostile inputs are about the request path, not decoding speed.
MAX_TOKENS = 2


@dataclass(frozen=True)
class Raw:
    """JSON text spliced into a body verbatim (``1e999``, ``NaN``, 5000 nested brackets)."""

    text: str


@dataclass(frozen=True)
class Hostile:
    """One hostile request. ``label`` says exactly what is hostile about it (it leads every failure message)."""

    label: str
    path: str
    body: bytes
    # "refuse": must be a 4xx (``status`` narrows it, ``field`` is what a 400 must name); "any": 2xx or 4xx.
    expect: str = "any"
    status: int | None = None
    field: str | None = None
    max_seconds: float = 5.0

    def short(self) -> str:
        return f"POST {self.path} {self.label}"


def encode(obj: Any) -> bytes:
    """JSON text of ``obj`` (ASCII-only: lone surrogates become ``\\udXXX`` escapes); ``Raw`` values spliced in."""
    raws: list[str] = []

    def swap(value: Any) -> Any:
        if isinstance(value, Raw):
            raws.append(value.text)
            return f"@@RAW{len(raws) - 1}@@"
        if isinstance(value, dict):
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    text = json.dumps(swap(obj), ensure_ascii=True, allow_nan=True)
    for i, raw in enumerate(raws):
        text = text.replace(f'"@@RAW{i}@@"', raw, 1)
    return text.encode()


def show(value: Any, limit: int = 60) -> str:
    """A short printable form of a hostile value for labels (escapes kept visible)."""
    text = value.text if isinstance(value, Raw) else repr(value)
    return text if len(text) <= limit else f"{text[:limit]}...({len(text)} chars)"


# --------------------------------------------------------------------------------------------------------------------
# Normal requests (the soak's background load, the liveness probe after each hostile batch)
# --------------------------------------------------------------------------------------------------------------------


def chat_body(content: str = "Hello", max_tokens: int = MAX_TOKENS, **extra: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


def completion_body(prompt: Any = "Hello", max_tokens: int = MAX_TOKENS, **extra: Any) -> dict[str, Any]:
    return {"prompt": prompt, "max_tokens": max_tokens, **extra}


def tool_history(arguments: Any = '{"a": 1}', name: str = "f", call_id: str = "call_1") -> list[dict[str, Any]]:
    """A conversation whose assistant turn called a tool and whose last turn is the tool's result."""
    return [{"role": "user", "content": "use the tool"},
            {"role": "assistant", "content": None,
             "tool_calls": [{"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
            {"role": "tool", "tool_call_id": call_id, "content": "ok"}]


def tool(name: str = "f", description: str = "a tool", parameters: Any = None) -> dict[str, Any]:
    if parameters is None:
        parameters = {"type": "object", "properties": {"a": {"type": "integer"}}}
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


# --------------------------------------------------------------------------------------------------------------------
# Hostile strings in every text field
# --------------------------------------------------------------------------------------------------------------------

LONE_SURROGATES = ("\ud800", "\udfff", "a\udc00b", "\udbff\udbff", "emoji half \ud83d", "\udc00" * 3)
# Valid JSON strings a tokenizer or prompt renderer may trip on; the server may answer them or refuse them.
NASTY_TEXT = ("\x00", "a\x00b", "\x1b[2J\x1b[31m", "\x7f\x85\x9f", "\u2028\u2029", "\ufeff", "\uffff\ufffe",
              "\r\n\t\x0b\x0c", "\U0010ffff", "<｜end▁of▁sentence｜>", "<｜DSML｜function_calls>", "</think>",
              "", " " * 5, "\u202e\u0301" * 4)


def has_lone_surrogate(text: str) -> bool:
    return any(0xD800 <= ord(ch) <= 0xDFFF for ch in text)


# (field a 400 must name, route, body builder). Every text field a client controls.
TEXT_FIELDS: list[tuple[str, str, Callable[[str], dict[str, Any]]]] = [
    ("messages.0.content", CHAT, lambda s: chat_body(s)),
    ("messages.0.content.0.text", CHAT,
     lambda s: {"messages": [{"role": "user", "content": [{"type": "text", "text": s}]}], "max_tokens": MAX_TOKENS}),
    ("messages.0.content (system)", CHAT,
     lambda s: {"messages": [{"role": "system", "content": s}, {"role": "user", "content": "hi"}],
                "max_tokens": MAX_TOKENS}),
    ("messages.0.name", CHAT,
     lambda s: {"messages": [{"role": "user", "content": "hi", "name": s}], "max_tokens": MAX_TOKENS}),
    ("messages.1.reasoning_content", CHAT,
     lambda s: {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b",
                                                                 "reasoning_content": s},
                             {"role": "user", "content": "c"}], "max_tokens": MAX_TOKENS}),
    ("messages.2.content (tool result)", CHAT,
     lambda s: {"messages": tool_history()[:2] + [{"role": "tool", "tool_call_id": "call_1", "content": s}],
                "tools": [tool()], "max_tokens": MAX_TOKENS}),
    ("messages.1.tool_calls.0.function.arguments", CHAT,
     lambda s: {"messages": tool_history(json.dumps({"a": s}, ensure_ascii=False)), "tools": [tool()],
                "max_tokens": MAX_TOKENS}),
    ("messages.1.tool_calls.0.function.name", CHAT,
     lambda s: {"messages": tool_history(name=s), "tools": [tool()], "max_tokens": MAX_TOKENS}),
    ("messages.1.tool_calls.0.id", CHAT,
     lambda s: {"messages": tool_history(call_id=s), "tools": [tool()], "max_tokens": MAX_TOKENS}),
    ("tools.0.function.description", CHAT, lambda s: chat_body(tools=[tool(description=s)])),
    ("tools.0.function.name", CHAT, lambda s: chat_body(tools=[tool(name=s)])),
    ("tools.0.function.parameters", CHAT,
     lambda s: chat_body(tools=[tool(parameters={"type": "object", "properties": {
         "a": {"type": "string", "description": s, "enum": [s, "x"]}}})])),
    ("tool_choice.function.name", CHAT,
     lambda s: chat_body(tools=[tool()], tool_choice={"type": "function", "function": {"name": s}})),
    ("stop", CHAT, lambda s: chat_body(stop=s)),
    ("stop.1", COMPLETIONS, lambda s: completion_body(stop=["x", s])),
    ("model", CHAT, lambda s: chat_body(model=s)),
    ("model", COMPLETIONS, lambda s: completion_body(model=s)),
    ("model", TOKENIZE, lambda s: {"model": s, "prompt": "hi"}),
    ("user", CHAT, lambda s: chat_body(user=s)),
    ("request_id", CHAT, lambda s: chat_body(request_id=s)),
    ("reasoning_effort", CHAT, lambda s: chat_body(reasoning_effort=s)),
    ("prompt", COMPLETIONS, lambda s: completion_body(s)),
    ("prompt.1", COMPLETIONS, lambda s: completion_body(["hi", s])),
    ("prompt", TOKENIZE, lambda s: {"prompt": s}),
    ("messages.0.content", TOKENIZE, lambda s: {"messages": [{"role": "user", "content": s}]}),
    ("logit_bias", CHAT, lambda s: chat_body(logit_bias={s: 1.0})),
    ("guided_regex", COMPLETIONS, lambda s: completion_body(guided_regex=s)),
    ("guided_choice.0", COMPLETIONS, lambda s: completion_body(guided_choice=[s, "b"])),
    ("structured_outputs", CHAT, lambda s: chat_body(structured_outputs={"choice": ["a", s]})),
    ("response_format.json_schema", CHAT,
     lambda s: chat_body(response_format={"type": "json_schema", "json_schema": {
         "name": s, "schema": {"type": "object", "properties": {"a": {"const": s}}}}})),
    ("chat_template_kwargs", CHAT, lambda s: chat_body(chat_template_kwargs={"thinking": s})),
]


def text_case(field_name: str, path: str, build: Callable[[str], dict[str, Any]], text: str) -> Hostile:
    """``text`` in ``field_name``: a lone surrogate must be a 400 naming the field; anything else 2xx or 4xx."""
    label = f"{field_name} = {show(text)}"
    if has_lone_surrogate(text):
        return Hostile(label, path, encode(build(text)), expect="refuse", status=400,
                       field=field_name.split(" ")[0])
    return Hostile(label, path, encode(build(text)))


def unknown_key_cases() -> Iterator[Hostile]:
    """Unknown fields are accepted (and logged): a lone surrogate in one's name or value must still be a 400."""
    yield Hostile("unknown field named '\\ud800'", CHAT, encode({**chat_body(), "\ud800": 1}), expect="refuse",
                  status=400)
    yield Hostile("unknown field x = '\\ud800'", CHAT, encode({**chat_body(), "x": "a\ud800"}), expect="refuse",
                  status=400, field="x")
    yield Hostile("unknown field with control characters", CHAT, encode({**chat_body(), "x\x00\x1b": "\x00"}))


def surrogate_cases() -> Iterator[Hostile]:
    for field_name, path, build in TEXT_FIELDS:
        for text in LONE_SURROGATES[:2]:
            yield text_case(field_name, path, build, text)
    yield from unknown_key_cases()


def control_character_cases() -> Iterator[Hostile]:
    for field_name, path, build in TEXT_FIELDS:
        for text in NASTY_TEXT:
            yield text_case(field_name, path, build, text)


# --------------------------------------------------------------------------------------------------------------------
# Deep and wide JSON in every schema-bearing field
# --------------------------------------------------------------------------------------------------------------------

DEPTHS = (50, 250, 1000, 5000)
# Nesting past this is hostile: refusing it (or compiling it) must take well under a second. 50 levels of a valid
# schema is unusual but legitimate, and compiling it may take a second or two on a small CPU.
DEEP = 100


def deep_object_schema(depth: int) -> Raw:
    """A valid JSON Schema ``depth`` objects deep (properties in properties)."""
    return Raw('{"type":"object","properties":{"a":' * depth + '{"type":"string"}' + "}}" * depth)


def deep_array_schema(depth: int) -> Raw:
    return Raw('{"type":"array","items":' * depth + '{"type":"integer"}' + "}" * depth)


def deep_anyof_schema(depth: int) -> Raw:
    return Raw('{"anyOf":[{"type":"null"},' * depth + '{"type":"integer"}' + "]}" * depth)


def deep_brackets(depth: int) -> Raw:
    """Not a schema: ``[[[...]]]`` (an array where an object is expected, below the validators' first look)."""
    return Raw("[" * depth + "]" * depth)


def deep_plain_object(depth: int) -> Raw:
    return Raw('{"a":' * depth + "1" + "}" * depth)


def wide_object_schema(width: int) -> Raw:
    props = ",".join(f'"p{i}":{{"type":"string"}}' for i in range(width))
    return Raw('{"type":"object","properties":{' + props + '},"required":["p0"]}')


def wide_enum_schema(width: int) -> Raw:
    return Raw('{"enum":[' + ",".join(str(i) for i in range(width)) + "]}")


SHAPES: dict[str, Callable[[int], Raw]] = {
    "nested properties": deep_object_schema,
    "nested items": deep_array_schema,
    "nested anyOf": deep_anyof_schema,
    "nested plain objects": deep_plain_object,
    "nested brackets": deep_brackets,
}
WIDE: dict[str, Raw] = {"20000 properties": wide_object_schema(20000), "100000 enum values": wide_enum_schema(100000)}


def _as_json_string(value: Raw) -> str:
    return value.text


# (field, route, body builder taking the schema's JSON text as a Raw).
SCHEMA_FIELDS: list[tuple[str, str, Callable[[Raw], dict[str, Any]]]] = [
    ("response_format.json_schema.schema", CHAT,
     lambda v: chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": v}})),
    ("tools.0.function.parameters", CHAT, lambda v: chat_body(tools=[tool(parameters=v)])),
    ("tools.0.function.parameters (tool_choice=required)", CHAT,
     lambda v: chat_body(tools=[tool(parameters=v)], tool_choice="required")),
    ("tools.0.function.parameters (tokenize)", TOKENIZE,
     lambda v: {"messages": [{"role": "user", "content": "hi"}], "tools": [tool(parameters=v)]}),
    ("structured_outputs.json", CHAT, lambda v: chat_body(structured_outputs={"json": v})),
    ("structured_outputs.json (as text)", COMPLETIONS,
     lambda v: completion_body(structured_outputs={"json": _as_json_string(v)})),
    ("guided_json", COMPLETIONS, lambda v: completion_body(guided_json=v)),
    ("guided_json (as text)", COMPLETIONS, lambda v: completion_body(guided_json=_as_json_string(v))),
    ("json_schema", COMPLETIONS, lambda v: completion_body(json_schema=v)),
    ("response_format.structures.0.schema (structural_tag)", CHAT,
     lambda v: chat_body(response_format={"type": "structural_tag", "structures": [
         {"begin": "<a>", "schema": v, "end": "</a>"}], "triggers": ["<a"]})),
    ("structured_outputs.structural_tag", CHAT,
     lambda v: chat_body(structured_outputs={"structural_tag": {"type": "structural_tag", "format": {
         "type": "json_schema", "json_schema": v}}})),
    ("messages.1.tool_calls.0.function.arguments (text)", CHAT,
     lambda v: {"messages": tool_history(_as_json_string(v)), "tools": [tool()], "max_tokens": MAX_TOKENS}),
    ("messages.1.tool_calls.0.function.arguments (object)", CHAT,
     lambda v: {"messages": tool_history(v), "tools": [tool()], "max_tokens": MAX_TOKENS}),
    ("chat_template_kwargs", CHAT, lambda v: chat_body(chat_template_kwargs={"x": v})),
    ("unknown field", CHAT, lambda v: chat_body(x=v)),
]


def deep_case(field_name: str, path: str, build: Callable[[Raw], dict[str, Any]], shape: str, depth: int) -> Hostile:
    # "Well under 1 s": refusing a deep document must not take the server's time.
    return Hostile(f"{field_name} = {shape}, {depth} levels", path, encode(build(SHAPES[shape](depth))),
                   max_seconds=1.0 if depth > DEEP else 5.0)


def deep_cases(depths: tuple[int, ...] = DEPTHS) -> Iterator[Hostile]:
    for depth in depths:
        for field_name, path, build in SCHEMA_FIELDS:
            for shape in SHAPES:
                yield deep_case(field_name, path, build, shape, depth)


def wide_cases() -> Iterator[Hostile]:
    for field_name, path, build in SCHEMA_FIELDS:
        for shape, value in WIDE.items():
            yield Hostile(f"{field_name} = {shape}", path, encode(build(value)), max_seconds=5.0)


# Structured-output specs that are not valid: each must be refused at the boundary (4xx), never reach the engine.
MALFORMED_STRUCTURED_OUTPUTS: list[tuple[str, str, dict[str, Any]]] = [
    ("response_format.structures", CHAT, chat_body(response_format={"type": "structural_tag", "structures": "x"})),
    ("response_format.structures", CHAT, chat_body(response_format={"type": "structural_tag", "structures": [1]})),
    ("response_format.structures", CHAT,
     chat_body(response_format={"type": "structural_tag", "structures": [{"begin": "<a>"}], "triggers": ["<a"]})),
    ("response_format.triggers", CHAT,
     chat_body(response_format={"type": "structural_tag", "structures": [
         {"begin": "<a>", "schema": {"type": "object"}, "end": "</a>"}], "triggers": "x"})),
    ("response_format.structures", CHAT,
     chat_body(response_format={"type": "structural_tag", "structures": [
         {"begin": "<a>", "schema": "not a schema", "end": "</a>"}], "triggers": ["<a"]})),
    ("response_format.format", CHAT, chat_body(response_format={"type": "structural_tag", "format": "x"})),
    ("response_format.format", CHAT,
     chat_body(response_format={"type": "structural_tag", "format": {"type": "no such format"}})),
    ("response_format", CHAT, chat_body(response_format={"type": "structural_tag"})),
    ("response_format.json_schema.schema", CHAT,
     chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": []}})),
    ("response_format.json_schema.schema", CHAT,
     chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
         "type": "no such type"}}})),
    ("response_format.json_schema.schema", CHAT,
     chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
         "$ref": "#/$defs/missing"}}})),
    ("response_format.json_schema.schema", CHAT,
     chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
         "$ref": "#"}}})),
    ("structured_outputs.structural_tag", CHAT, chat_body(structured_outputs={"structural_tag": "not json {"})),
    ("structured_outputs.structural_tag", CHAT, chat_body(structured_outputs={"structural_tag": {"x": 1}})),
    ("structured_outputs.structural_tag", CHAT, chat_body(structured_outputs={"structural_tag": 5})),
    ("structured_outputs.json", CHAT, chat_body(structured_outputs={"json": "not json {"})),
    ("structured_outputs.json", CHAT, chat_body(structured_outputs={"json": 5})),
    ("structured_outputs.json", CHAT, chat_body(structured_outputs={"json": {"type": 5}})),
    ("structured_outputs.regex", CHAT, chat_body(structured_outputs={"regex": "("})),
    ("structured_outputs.regex", CHAT, chat_body(structured_outputs={"regex": 5})),
    ("structured_outputs.grammar", CHAT, chat_body(structured_outputs={"grammar": "root ::= "})),
    ("structured_outputs.grammar", CHAT, chat_body(structured_outputs={"grammar": "not a grammar at all"})),
    ("structured_outputs.choice", CHAT, chat_body(structured_outputs={"choice": []})),
    ("structured_outputs.choice", CHAT, chat_body(structured_outputs={"choice": "x"})),
    ("structured_outputs.choice", CHAT, chat_body(structured_outputs={"choice": [1, None]})),
    ("structured_outputs", CHAT, chat_body(structured_outputs={"json_object": "yes", "regex": "a"})),
    ("guided_regex", COMPLETIONS, completion_body(guided_regex="[a-")),
    ("guided_grammar", COMPLETIONS, completion_body(guided_grammar="root ::= (")),
    ("guided_json", COMPLETIONS, completion_body(guided_json="{")),
    ("guided_json", COMPLETIONS, completion_body(guided_json={"type": "object", "properties": 5})),
    ("json_schema", COMPLETIONS, completion_body(json_schema="[1, 2")),
    ("ebnf", COMPLETIONS, completion_body(ebnf="root ::= undefined_rule")),
    ("tools.0.function.parameters", CHAT, chat_body(tools=[tool(parameters={"type": "object", "properties": []})])),
    ("tools.0.function.parameters", CHAT,
     chat_body(tools=[tool(parameters={"type": "object", "properties": {"a": {"$ref": "#/nowhere"}}})],
               tool_choice="required")),
]


def malformed_structured_output_cases() -> Iterator[Hostile]:
    for field_name, path, body in MALFORMED_STRUCTURED_OUTPUTS:
        spec = {k: v for k, v in body.items() if k not in ("messages", "max_tokens", "prompt")}
        yield Hostile(f"{field_name}: {show(json.dumps(spec), 120)}", path, encode(body), expect="refuse",
                      field=field_name.split(".")[0])


# --------------------------------------------------------------------------------------------------------------------
# Numbers: non-finite floats, huge integers
# --------------------------------------------------------------------------------------------------------------------

NON_FINITE = ("NaN", "Infinity", "-Infinity", "1e999", "-1e999")
FLOAT_FIELDS: list[tuple[str, str, Callable[[Any], dict[str, Any]]]] = [
    ("temperature", CHAT, lambda v: chat_body(temperature=v)),
    ("top_p", CHAT, lambda v: chat_body(top_p=v)),
    ("min_p", CHAT, lambda v: chat_body(min_p=v)),
    ("presence_penalty", CHAT, lambda v: chat_body(presence_penalty=v)),
    ("frequency_penalty", COMPLETIONS, lambda v: completion_body(frequency_penalty=v)),
    ("repetition_penalty", CHAT, lambda v: chat_body(repetition_penalty=v)),
    ("logit_bias.1", CHAT, lambda v: chat_body(logit_bias={"1": v})),
    ("logit_bias.1", COMPLETIONS, lambda v: completion_body(logit_bias={"1": v})),
    ("temperature", COMPLETIONS, lambda v: completion_body(temperature=v)),
    ("top_k", CHAT, lambda v: chat_body(top_k=v)),
    ("max_tokens", CHAT, lambda v: chat_body(max_tokens=v)),
    ("n", COMPLETIONS, lambda v: completion_body(n=v)),
    ("seed", CHAT, lambda v: chat_body(seed=v)),
    ("tools.0.function.parameters", CHAT,
     lambda v: chat_body(tools=[tool(parameters={"type": "object", "properties": {
         "a": {"type": "number", "maximum": v}}})], tool_choice="required")),
    ("response_format.json_schema.schema", CHAT,
     lambda v: chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
         "type": "number", "minimum": v}}})),
]


def non_finite_cases() -> Iterator[Hostile]:
    """NaN, +-Infinity and 1e999 (which Python reads as inf) in every numeric field: a 400 naming the field."""
    for field_name, path, build in FLOAT_FIELDS:
        for token in NON_FINITE:
            yield Hostile(f"{field_name} = {token}", path, encode(build(Raw(token))), expect="refuse", status=400,
                          field=field_name.split(".")[0])


def float_case(field_name: str, path: str, build: Callable[[Any], dict[str, Any]], value: float) -> Hostile:
    token = json.dumps(value, allow_nan=True)
    finite = token not in ("NaN", "Infinity", "-Infinity")
    return Hostile(f"{field_name} = {token}", path, encode(build(Raw(token))), expect="any" if finite else "refuse",
                   status=None if finite else 400, field=None if finite else field_name.split(".")[0])


# As JSON text: 10**5000 is past Python's int-to-str limit (4300 digits), and a client can send it all the same.
HUGE_INTS = (str(10**30), str(-(10**30)), str(2**63), str(2**64), str(-(2**63) - 1), "1" + "0" * 5000)
INT_FIELDS: list[tuple[str, str, Callable[[Any], dict[str, Any]]]] = [
    ("max_tokens", CHAT, lambda v: chat_body(max_tokens=v)),
    ("max_completion_tokens", CHAT, lambda v: chat_body(max_completion_tokens=v)),
    ("max_tokens", COMPLETIONS, lambda v: completion_body(max_tokens=v)),
    ("n", CHAT, lambda v: chat_body(n=v)),
    ("best_of", COMPLETIONS, lambda v: completion_body(best_of=v)),
    ("top_k", CHAT, lambda v: chat_body(top_k=v)),
    ("seed", CHAT, lambda v: chat_body(seed=v)),
    ("min_tokens", CHAT, lambda v: chat_body(min_tokens=v)),
    ("top_logprobs", CHAT, lambda v: chat_body(logprobs=True, top_logprobs=v)),
    ("logprobs", COMPLETIONS, lambda v: completion_body(logprobs=v)),
    ("prompt_logprobs", COMPLETIONS, lambda v: completion_body(prompt_logprobs=v)),
    ("stop_token_ids.0", CHAT, lambda v: chat_body(stop_token_ids=[v])),
    ("logit_bias", CHAT, lambda v: chat_body(logit_bias={str(v): 1})),
    ("prompt.1", COMPLETIONS, lambda v: completion_body([1, v])),
    ("prompt.0.0", COMPLETIONS, lambda v: completion_body([[v]])),
    ("tokens.0", DETOKENIZE, lambda v: {"tokens": [v]}),
    ("temperature", CHAT, lambda v: chat_body(temperature=v)),
    ("tools.0.function.parameters", CHAT,
     lambda v: chat_body(tools=[tool(parameters={"type": "object", "properties": {
         "a": {"type": "array", "maxItems": v, "minItems": v}}})], tool_choice="required")),
    ("response_format.json_schema.schema", CHAT,
     lambda v: chat_body(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {
         "type": "string", "minLength": v}}})),
]


def int_case(field_name: str, path: str, build: Callable[[Any], dict[str, Any]], value: str) -> Hostile:
    shown = value if len(value) < 40 else f"<{len(value.lstrip('-'))}-digit integer>"
    return Hostile(f"{field_name} = {shown}", path, encode(build(Raw(value))))


def huge_int_cases() -> Iterator[Hostile]:
    for field_name, path, build in INT_FIELDS:
        for value in HUGE_INTS:
            yield int_case(field_name, path, build, value)


# --------------------------------------------------------------------------------------------------------------------
# Odd documents: duplicate keys, big bodies, big batches
# --------------------------------------------------------------------------------------------------------------------


def duplicate_key_cases() -> Iterator[Hostile]:
    msgs = '[{"role":"user","content":"hi"}]'
    yield Hostile("duplicate keys: messages twice, max_tokens twice", CHAT,
                  f'{{"messages":{msgs},"max_tokens":2,"messages":{msgs},"max_tokens":3}}'.encode())
    yield Hostile("duplicate keys: max_tokens 10000 times", CHAT,
                  ('{"messages":' + msgs + "," + ",".join(['"max_tokens":2'] * 10000) + "}").encode())
    yield Hostile("duplicate keys: stream true then false", CHAT,
                  f'{{"messages":{msgs},"max_tokens":2,"stream":true,"stream":false}}'.encode())
    yield Hostile("duplicate keys: 'type' twice in response_format.json_schema.schema", CHAT,
                  ('{"messages":' + msgs + ',"max_tokens":2,"response_format":{"type":"json_schema","json_schema":'
                   '{"name":"x","schema":{"type":"object","type":"array"}}}}').encode())
    yield Hostile("duplicate keys: 'role' twice in a message", CHAT,
                  b'{"messages":[{"role":"user","role":"assistant","content":"hi"}],"max_tokens":2}')
    yield Hostile("duplicate keys: logit_bias '1' twice", CHAT,
                  ('{"messages":' + msgs + ',"max_tokens":2,"logit_bias":{"1":1,"1":NaN}}').encode(),
                  expect="refuse", status=400, field="logit_bias")


def big_body_cases(megabytes: int = 6) -> Iterator[Hostile]:
    size = megabytes * 1024 * 1024
    yield Hostile(f"messages.0.content = {megabytes} MB of text", CHAT, encode(chat_body("ab " * (size // 3))),
                  expect="refuse", max_seconds=10.0)
    yield Hostile(f"prompt = {megabytes} MB of text", COMPLETIONS, encode(completion_body("ab " * (size // 3))),
                  expect="refuse", max_seconds=10.0)
    yield Hostile(f"prompt = {size // 8} token ids", COMPLETIONS,
                  encode(completion_body(Raw("[" + ",".join(["1"] * (size // 8)) + "]"))), expect="refuse",
                  max_seconds=10.0)
    yield Hostile(f"{megabytes} MB of '['", CHAT, b"[" * size, expect="refuse", max_seconds=10.0)
    yield Hostile(f"{megabytes} MB of whitespace", CHAT, b" " * size + encode(chat_body()), max_seconds=10.0)
    yield Hostile(f"unknown field x = {megabytes} MB array of nulls", CHAT,
                  encode(chat_body(x=Raw("[" + ",".join(["null"] * (size // 5)) + "]"))), max_seconds=10.0)


def batch_case(prompts: int) -> Hostile:
    return Hostile(f"completions batch of {prompts} prompts", COMPLETIONS,
                   encode(completion_body(["hi"] * prompts, max_tokens=1)), max_seconds=15.0)


# --------------------------------------------------------------------------------------------------------------------
# Random draws (the soak and the hypothesis-driven parts)
# --------------------------------------------------------------------------------------------------------------------

FAMILIES: dict[str, Callable[[], Iterator[Hostile]]] = {
    "lone surrogates": surrogate_cases,
    "control characters": control_character_cases,
    "deep JSON": lambda: deep_cases((50, 250, 1000, 5000)),
    "malformed structured outputs": malformed_structured_output_cases,
    "non-finite numbers": non_finite_cases,
    "huge integers": huge_int_cases,
    "duplicate keys": duplicate_key_cases,
}


def all_small_cases() -> list[Hostile]:
    """Every hostile case of the families above (bodies of at most a few hundred KB)."""
    return [case for family in FAMILIES.values() for case in family()]


def random_hostile(rng: random.Random, pool: list[Hostile] | None = None) -> Hostile:
    """One hostile case drawn from ``pool`` (default: every small case), or a fresh random one."""
    roll = rng.random()
    if roll < 0.15:
        field_name, path, build = rng.choice(TEXT_FIELDS)
        alphabet = [chr(rng.randrange(0xD800, 0xE000)), chr(rng.randrange(0, 0x20)), "\x7f", "a", "\u2028",
                    chr(rng.randrange(0x10000, 0x110000))]
        return text_case(field_name, path, build, "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 6))))
    if roll < 0.25:
        field_name, path, build = rng.choice(SCHEMA_FIELDS)
        return deep_case(field_name, path, build, rng.choice(list(SHAPES)), rng.choice((50, 250, 1000, 5000)))
    return rng.choice(pool if pool is not None else all_small_cases())


# --------------------------------------------------------------------------------------------------------------------
# The contract
# --------------------------------------------------------------------------------------------------------------------


def error_envelope_problem(body: bytes) -> str | None:
    """None when ``body`` is OpenAI's error envelope, else what is wrong with it."""
    try:
        payload = json.loads(body)
    except ValueError:
        return f"a 4xx whose body is not JSON: {body[:200]!r}"
    error = payload.get("error") if isinstance(payload, dict) else None
    if not isinstance(error, dict) or not {"message", "type", "param", "code"} <= set(error):
        return f"a 4xx without the OpenAI error envelope {{'error': {{message, type, param, code}}}}: {body[:200]!r}"
    if not isinstance(error["message"], str) or not error["message"]:
        return f"a 4xx whose error.message is empty: {body[:200]!r}"
    return None


def anthropic_error_problem(body: bytes) -> str | None:
    """None when ``body`` is Anthropic's error envelope (the ``/v1/messages`` routes), else what is wrong with it."""
    try:
        payload = json.loads(body)
    except ValueError:
        return f"a 4xx whose body is not JSON: {body[:200]!r}"
    if not isinstance(payload, dict) or payload.get("type") != "error":
        return f"a 4xx without Anthropic's error envelope {{'type': 'error', 'error': {{...}}}}: {body[:200]!r}"
    error = payload.get("error")
    if not isinstance(error, dict) or not {"type", "message"} <= set(error):
        return f"a 4xx whose Anthropic error lacks its type or message: {body[:200]!r}"
    if not isinstance(error["message"], str) or not error["message"]:
        return f"a 4xx whose error.message is empty: {body[:200]!r}"
    return None


def ollama_error_problem(body: bytes) -> str | None:
    """None when ``body`` is Ollama's error body ``{"error": "message"}`` (the ``/api`` routes), else what is wrong
    with it."""
    try:
        payload = json.loads(body)
    except ValueError:
        return f"a 4xx whose body is not JSON: {body[:200]!r}"
    if not isinstance(payload, dict) or list(payload) != ["error"]:
        return f"a 4xx without Ollama's error body {{'error': message}}: {body[:200]!r}"
    if not isinstance(payload["error"], str) or not payload["error"]:
        return f"a 4xx whose error message is empty: {body[:200]!r}"
    return None


def names_field(error: dict[str, Any], field_name: str) -> bool:
    """Whether an error names ``field_name`` (in ``param`` or the message), in dotted or bracketed spelling."""
    leaf = field_name.split(".")[0]
    spellings = {field_name, leaf, field_name.replace(".", "[", 1), leaf.replace("_", " ")}
    texts = [str(error.get("param") or ""), str(error.get("message") or "")]
    return any(s and s in t for s in spellings for t in texts)


def contract_violation(case: Hostile, status: int | None, body: bytes, elapsed: float,
                       transport_error: str | None = None) -> str | None:
    """None when the answer keeps the contract, else one line saying what broke."""
    if transport_error is not None:
        return transport_error
    assert status is not None
    text = body[:300].decode(errors="replace")
    if status >= 500:
        return f"{status} (a server error; must be 2xx or 4xx): {text}"
    if not (200 <= status < 300 or 400 <= status < 500):
        return f"unexpected status {status}: {text}"
    if elapsed > case.max_seconds:
        return f"{status} after {elapsed:.2f}s (limit {case.max_seconds:.1f}s)"
    if status >= 400:
        problem = error_envelope_problem(body)
        if problem:
            return problem
    if case.expect == "refuse":
        if status < 400:
            return f"{status} accepted; this input must be refused with a 4xx: {text[:150]}"
        if case.status is not None and status != case.status:
            return f"{status} (expected {case.status}): {text}"
        if case.field is not None and status == 400:
            error = json.loads(body)["error"]
            if not names_field(error, case.field):
                return f"400 that does not name the field {case.field!r} (param={error.get('param')!r}): {text}"
    return None
