"""The HTTP layer end to end with a scripted engine (a test double of Contract B's AsyncLLM that replays given
completion text as deltas, as the engine sends them): the exact SSE chunk order for thinking + content + a tool
call, the same answer without streaming, what the server asks of the engine (stop strings, forced tool-call prompt),
and logprob token strings decoded by the server (the engine sends ids, floats and ranks).

The real engine with random weights never writes a tool call, so this is where a whole tool-call turn goes through
the server.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
from fastapi.testclient import TestClient

from dsv32.config import EngineConfig, tiny_config
from dsv32.encoding.encode import DSML_TOKEN
from dsv32.engine.outputs import CompletionOutput, Logprob, RequestOutput
from dsv32.engine.sampling_params import SamplingParams
from dsv32.engine.validation import RequestValidator
from dsv32.server.app import build_app
from dsv32.server.settings import ServerConfig
from dsv32.tokenizer import Tokenizer

INVOKE = f'<{DSML_TOKEN}invoke name="get_weather">\n'
PARAM = f'<{DSML_TOKEN}parameter name="city" string="true">Paris</{DSML_TOKEN}parameter>\n'
CALL_BODY = f"{PARAM}</{DSML_TOKEN}invoke>\n</{DSML_TOKEN}function_calls>"
TOOL_TURN = ["Need ", "the weather.", "</think>", "Let me check.", f"\n\n<{DSML_TOKEN}function_calls>\n",
             INVOKE, PARAM[:30], PARAM[30:], f"</{DSML_TOKEN}invoke>\n</{DSML_TOKEN}function_calls>"]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
USER = [{"role": "user", "content": "Weather in Paris?"}]


@dataclass
class ScriptedEngine:
    """Replays a script (one text piece per engine step, one token each) for every request; completion ``i`` of
    an ``n > 1`` request plays ``extra_scripts[i - 1]`` when given, so siblings can finish at different steps."""

    tokenizer: Tokenizer
    script: list[str] = field(default_factory=list)
    stop_reason: str | None = None
    extra_scripts: list[list[str]] = field(default_factory=list)
    calls: list[tuple[list[int], SamplingParams, str | None]] = field(default_factory=list)
    model_config = tiny_config()
    engine_config = EngineConfig()
    max_model_len = 1024
    validator = RequestValidator(max_model_len, model_config.vocab_size, engine_config.max_logprobs,
                                 engine_config.max_num_seqs)
    is_running = True

    async def generate(self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str,
                       prompt: str | None = None, admitted: bool = False) -> AsyncIterator[RequestOutput]:
        self.calls.append((prompt_token_ids, sampling_params, prompt))
        scripts = [self.script, *self.extra_scripts][:sampling_params.n]
        for step in range(max(len(script) for script in scripts)):
            # Deltas, as the engine sends them: this step's piece and token; a finished sibling has nothing new.
            completions = []
            for index, script in enumerate(scripts):
                new = script[step:step + 1]
                done = step + 1 >= len(script)
                token_ids = [100 + step] if new else []
                # Asked for logprobs: the token and one alternative per position, without strings (the engine's).
                logprobs = None if sampling_params.logprobs is None else [
                    {token_id: Logprob(-0.5, 1), token_id + 1000: Logprob(-1.5, 2)} for token_id in token_ids]
                completions.append(CompletionOutput(index=index, text="".join(new), token_ids=token_ids,
                                                    logprobs=logprobs, finish_reason="stop" if done else None,
                                                    stop_reason=self.stop_reason if done else None))
            finished = all(c.finish_reason for c in completions)
            yield RequestOutput(request_id, prompt if step == 0 else None, prompt_token_ids if step == 0 else [],
                                completions, finished=finished)

    def admit(self, num_seqs: int) -> None:
        return None

    async def abort(self, request_id: str) -> None:
        return None

    def stats(self) -> SimpleNamespace:
        return SimpleNamespace(num_running=0, num_waiting=0, num_total_blocks=1, num_free_blocks=1,
                               kv_cache_usage=0.0, prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0,
                               prompt_tokens_total=0, generation_tokens_total=0, spec_decode=None)

    async def shutdown(self) -> None:
        return None


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_pretrained("tiny")


def client_for(engine: ScriptedEngine, config: ServerConfig | None = None) -> TestClient:
    return TestClient(build_app(engine, config or ServerConfig()))


def sse_payloads(response) -> list[dict]:
    lines = [line for line in response.text.split("\n") if line]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]


def test_stream_sends_vllms_chunk_order(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, TOOL_TURN)
    body = {"messages": USER, "tools": [WEATHER_TOOL], "stream": True, "stream_options": {"include_usage": True},
            "chat_template_kwargs": {"thinking": True}}
    payloads = sse_payloads(client_for(engine).post("/v1/chat/completions", json=body))
    deltas = [p["choices"][0]["delta"] for p in payloads if p["choices"]]
    kinds = []
    for delta in deltas:
        kind = next((k for k in ("role", "reasoning", "content", "tool_calls") if k in delta), "final")
        if not kinds or kinds[-1] != kind:
            kinds.append(kind)
    assert kinds == ["role", "reasoning", "content", "tool_calls", "final"]
    assert deltas[0] == {"role": "assistant", "content": ""}
    reasoning = [d for d in deltas if "reasoning" in d]
    assert all(d["reasoning"] == d["reasoning_content"] for d in reasoning)
    assert "".join(d["reasoning"] for d in reasoning) == "Need the weather."
    assert "".join(d.get("content") or "" for d in deltas) == "Let me check."
    calls = [call for d in deltas for call in d.get("tool_calls", [])]
    # The header (id, type, name) comes first; later pieces carry only argument fragments of index 0. A step that
    # both opens the call and starts its arguments sends them in one entry, as vLLM does for a burst.
    header, fragments = calls[0], calls[1:]
    assert header["id"].startswith("call_") and header["type"] == "function"
    assert header["function"]["name"] == "get_weather"
    assert fragments and all(set(f) == {"index", "function"} and f["index"] == 0 for f in fragments)
    assert json.loads("".join(call["function"]["arguments"] for call in calls)) == {"city": "Paris"}
    final = [p for p in payloads if p["choices"] and p["choices"][0]["finish_reason"]]
    assert len(final) == 1 and final[0]["choices"][0]["finish_reason"] == "tool_calls"
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == len(TOOL_TURN)


def test_non_stream_gives_the_same_answer(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, TOOL_TURN)
    body = {"messages": USER, "tools": [WEATHER_TOOL], "chat_template_kwargs": {"thinking": True}}
    choice = client_for(engine).post("/v1/chat/completions", json=body).json()["choices"][0]
    message = choice["message"]
    assert choice["finish_reason"] == "tool_calls"
    assert message["reasoning"] == message["reasoning_content"] == "Need the weather."
    assert message["content"] == "Let me check."
    assert len(message["tool_calls"]) == 1
    call = message["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and json.loads(call["function"]["arguments"]) == {
        "city": "Paris"}


def test_named_tool_choice_is_a_grammar_and_auto_single_call_a_stop(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, [f"\n\n<{DSML_TOKEN}function_calls>\n", INVOKE, CALL_BODY])
    body = {"messages": USER, "tools": [WEATHER_TOOL], "parallel_tool_calls": False, "stop": ["END"],
            "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}
    choice = client_for(engine).post("/v1/chat/completions", json=body).json()["choices"][0]
    _, params, prompt = engine.calls[0]
    assert prompt.endswith("<｜Assistant｜></think>")
    assert params.stop == ["END"]  # the grammar allows one call
    assert 'invoke name=\\"get_weather\\"' in params.structured_outputs.structural_tag
    assert choice["finish_reason"] == "tool_calls" and choice["stop_reason"] is None
    assert json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]) == {"city": "Paris"}
    assert choice["message"]["content"] is None
    # "auto" without strict tools has no grammar: a stop string ends the first call.
    client_for(engine).post("/v1/chat/completions", json={**body, "tool_choice": "auto"})
    params = engine.calls[1][1]
    assert params.stop == ["END", f"</{DSML_TOKEN}invoke>"] and params.structured_outputs is None


def test_sampling_fields_reach_the_engine(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, ["ok"])
    body = {"messages": USER, "temperature": 0.3, "top_p": 0.9, "top_k": 20, "min_p": 0.05, "seed": 9,
            "presence_penalty": 0.5, "frequency_penalty": 0.25, "repetition_penalty": 1.1, "min_tokens": 2,
            "max_completion_tokens": 50, "stop": "x", "stop_token_ids": [5], "logit_bias": {"7": 200},
            "ignore_eos": True, "n": 1, "include_stop_str_in_output": True, "skip_special_tokens": False}
    assert client_for(engine).post("/v1/chat/completions", json=body).status_code == 200
    params = engine.calls[0][1]
    assert (params.temperature, params.top_p, params.top_k, params.min_p, params.seed) == (0.3, 0.9, 20, 0.05, 9)
    assert (params.presence_penalty, params.frequency_penalty, params.repetition_penalty) == (0.5, 0.25, 1.1)
    assert (params.min_tokens, params.max_tokens, params.stop, params.stop_token_ids) == (2, 50, ["x"], [5])
    assert params.logit_bias == {7: 100.0}  # clamped to OpenAI's range
    assert params.ignore_eos and params.include_stop_str_in_output and not params.skip_special_tokens
    assert params.logprobs is None


def test_chat_max_tokens_defaults_to_the_rest_of_the_context(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, ["ok"])
    client_for(engine).post("/v1/chat/completions", json={"messages": USER})
    prompt_ids, params, _ = engine.calls[0]
    assert params.max_tokens == engine.max_model_len - len(prompt_ids)


def test_default_max_tokens_bounds_requests_that_set_none(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, ["ok"])
    client = client_for(engine, ServerConfig(default_max_tokens=7))
    client.post("/v1/chat/completions", json={"messages": USER})
    client.post("/v1/completions", json={"prompt": "x", "max_tokens": None})
    client.post("/v1/chat/completions", json={"messages": USER, "max_tokens": 300})
    assert [params.max_tokens for _, params, _ in engine.calls] == [7, 7, 300]


def test_streamed_siblings_finish_once_each(tokenizer: Tokenizer) -> None:
    engine = ScriptedEngine(tokenizer, ["a"], extra_scripts=[["b", "c", "d"]])
    body = {"prompt": "x", "n": 2, "stream": True, "stream_options": {"include_usage": True}}
    payloads = sse_payloads(client_for(engine).post("/v1/completions", json=body))
    choices = [p["choices"][0] for p in payloads if p["choices"]]
    assert "".join(c["text"] for c in choices if c["index"] == 0) == "a"
    assert "".join(c["text"] for c in choices if c["index"] == 1) == "bcd"
    assert sorted(c["index"] for c in choices if c["finish_reason"]) == [0, 1]
    assert payloads[-1]["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("stream", [False, True])
def test_logprob_strings_are_decoded_by_the_server(tokenizer: Tokenizer, stream: bool) -> None:
    engine = ScriptedEngine(tokenizer, ["a", "b", "c"])
    body = {"messages": USER, "logprobs": True, "top_logprobs": 2, "stream": stream}
    response = client_for(engine).post("/v1/chat/completions", json=body)
    if stream:
        entries = [entry for p in sse_payloads(response) if p["choices"] and p["choices"][0]["logprobs"]
                   for entry in p["choices"][0]["logprobs"]["content"]]
    else:
        entries = response.json()["choices"][0]["logprobs"]["content"]
    expected = [tokenizer.decode([100 + step], skip_special_tokens=False) for step in range(3)]
    assert [entry["token"] for entry in entries] == expected
    assert [[top["token"] for top in entry["top_logprobs"]] for entry in entries] == [
        [text, tokenizer.decode([100 + step + 1000], skip_special_tokens=False)]
        for step, text in enumerate(expected)]
