"""The OpenAI-compatible API of a real `dsv32 serve` process (tiny model, random weights), driven with the official
`openai` SDK and raw HTTP: models, chat (stream and not, thinking on/off, tools), completions (logprobs, echo,
batches), the tokenizer routes, metrics, auth, and every error the issue lists.

The tiny model's output is noise, so tests pin what the server guarantees: shapes, counts and finish reasons
(``ignore_eos`` with ``max_tokens=N`` always yields exactly N tokens), never the text itself.
"""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.server.conftest import API_KEY, ServerProcess

pytestmark = pytest.mark.e2e

MAX_MODEL_LEN = 1024
MAX_NUM_SEQS = 8
MAX_LOGPROBS = 30  # above vLLM's default 20: the configured limit rules in the server and the engine alike
USER = [{"role": "user", "content": "What is 2+2?"}]
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Current weather",
                                                 "parameters": {"type": "object", "properties": {
                                                     "city": {"type": "string"}}, "required": ["city"]}}}
# Exactly N output tokens whatever the random model samples.
FIXED = {"ignore_eos": True}


@pytest.fixture(scope="module")
def server(server_factory) -> ServerProcess:
    return server_factory("tiny", "--api-key", API_KEY, "--max-num-seqs", str(MAX_NUM_SEQS), "--served-model-name",
                          "dsv32-tiny", "--max-logprobs", str(MAX_LOGPROBS))


@pytest.fixture(scope="module")
def client(server: ServerProcess) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.base_url}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server: ServerProcess) -> httpx.Client:
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=120) as session:
        yield session


def prompt_tokens_of(http: httpx.Client, messages: list[dict], **fields: object) -> int:
    return http.post("/tokenize", json={"messages": messages, **fields}).json()["count"]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == status
    return error


# ---------------------------------------------------------------------------------------------------- basics


def test_models_list(client: openai.OpenAI) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["dsv32-tiny"]
    extra = models[0].model_extra
    assert extra["root"] == "tiny" and extra["max_model_len"] == MAX_MODEL_LEN
    assert client.models.retrieve("dsv32-tiny").id == "dsv32-tiny"


def test_health_version_and_tokenizer_info_need_no_key(server: ServerProcess) -> None:
    assert httpx.get(f"{server.base_url}/health").status_code == 200
    assert httpx.get(f"{server.base_url}/version").json()["version"]
    info = httpx.get(f"{server.base_url}/tokenizer_info").json()
    assert info["eos_token"] == "<｜end▁of▁sentence｜>" and info["bos_token_id"] == 0


def test_v1_routes_need_the_api_key(server: ServerProcess) -> None:
    error = error_of(httpx.get(f"{server.base_url}/v1/models"), 401)
    assert error["type"] == "AuthenticationError"
    wrong = httpx.get(f"{server.base_url}/v1/models", headers={"Authorization": "Bearer nope"})
    error_of(wrong, 401)


def test_tokenize_detokenize_round_trip(http: httpx.Client) -> None:
    body = http.post("/tokenize", json={"prompt": "Hello world", "return_token_strs": True}).json()
    assert body["tokens"][0] == 0 and body["count"] == len(body["tokens"]) and body["max_model_len"] == MAX_MODEL_LEN
    assert body["token_strs"][1:] == ["Hello", "Ġworld"]
    without_bos = http.post("/v1/tokenize", json={"prompt": "Hello world", "add_special_tokens": False}).json()
    assert without_bos["tokens"] == body["tokens"][1:]
    assert http.post("/detokenize", json={"tokens": without_bos["tokens"]}).json() == {"prompt": "Hello world"}
    chat = http.post("/tokenize", json={"messages": USER}).json()
    assert chat["count"] > 3


# ---------------------------------------------------------------------------------------------------- chat


def test_chat_non_stream(client: openai.OpenAI, http: httpx.Client) -> None:
    response = client.chat.completions.create(model="dsv32-tiny", messages=USER, max_tokens=6, extra_body=FIXED)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert response.model == "dsv32-tiny" and len(response.choices) == 1
    choice = response.choices[0]
    assert choice.finish_reason == "length" and choice.message.role == "assistant"
    assert isinstance(choice.message.content, str) and choice.message.tool_calls is None
    usage = response.usage
    assert usage.completion_tokens == 6
    assert usage.prompt_tokens == prompt_tokens_of(http, USER)
    assert usage.total_tokens == usage.prompt_tokens + 6
    assert usage.prompt_tokens_details is not None and usage.prompt_tokens_details.cached_tokens >= 0


def test_chat_stream_with_usage(client: openai.OpenAI, http: httpx.Client) -> None:
    stream = client.chat.completions.create(model="dsv32-tiny", messages=USER, max_tokens=7, stream=True,
                                            stream_options={"include_usage": True}, extra_body=FIXED)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    finish = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(finish) == 1 and finish[0].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 7
    assert chunks[-1].usage.prompt_tokens == prompt_tokens_of(http, USER)
    assert all(c.usage is None for c in chunks[:-1])
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_sse_framing_ends_with_done(http: httpx.Client) -> None:
    body = {"messages": USER, "max_tokens": 3, "stream": True, **FIXED}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    payloads = [json.loads(line[6:]) for line in lines[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in payloads)
    assert payloads[-1]["choices"][0]["delta"] == {} and payloads[-1]["choices"][0]["finish_reason"] == "length"


def test_thinking_on_puts_output_in_reasoning(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="dsv32-tiny", messages=USER, max_tokens=8,
        extra_body={**FIXED, "chat_template_kwargs": {"thinking": True}})
    message = response.choices[0].message
    extra = message.model_extra
    # Random tokens never close the thinking block: everything is reasoning, in both spellings.
    assert extra["reasoning_content"] and extra["reasoning"] == extra["reasoning_content"]
    assert message.content is None


def test_thinking_off_puts_output_in_content(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(
        model="dsv32-tiny", messages=USER, max_tokens=8,
        extra_body={**FIXED, "chat_template_kwargs": {"thinking": False}})
    message = response.choices[0].message
    assert message.content and message.model_extra["reasoning_content"] is None


def test_thinking_stream_sends_reasoning_deltas(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(model="dsv32-tiny", messages=USER, max_tokens=5, stream=True,
                                            reasoning_effort="high", extra_body=FIXED)
    deltas = [c.choices[0].delta for c in stream if c.choices]
    reasoning = "".join(d.model_extra.get("reasoning_content") or "" for d in deltas)
    assert reasoning and all(d.model_extra.get("reasoning") == d.model_extra.get("reasoning_content")
                             for d in deltas)
    assert not "".join(d.content or "" for d in deltas)


def test_thinking_changes_the_prompt(http: httpx.Client) -> None:
    on = http.post("/tokenize", json={"messages": USER, "chat_template_kwargs": {"thinking": True},
                                      "return_token_strs": True}).json()
    off = http.post("/tokenize", json={"messages": USER, "return_token_strs": True}).json()
    assert on["token_strs"][-1] == "<think>" and off["token_strs"][-1] == "</think>"


def test_n_choices_and_chat_logprobs(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="dsv32-tiny", messages=USER, max_tokens=4, n=2, logprobs=True,
                                              top_logprobs=3, seed=5, extra_body=FIXED)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.completion_tokens == 8
    for choice in response.choices:
        entries = choice.logprobs.content
        assert len(entries) == 4
        for entry in entries:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 3 and entry.bytes is not None
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[-1].logprob


def test_seeded_requests_repeat(client: openai.OpenAI) -> None:
    def run() -> str:
        return client.chat.completions.create(model="dsv32-tiny", messages=USER, max_tokens=6, seed=1234,
                                              temperature=1.0, extra_body=FIXED).choices[0].message.content

    assert run() == run()


# ---------------------------------------------------------------------------------------------------- tools


def test_tool_calling_round_trip_request_side(client: openai.OpenAI) -> None:
    """The model (random) will not call a tool; the request side of a tool loop must still work end to end:
    tools + tool_choice accepted, the tool turn re-encoded with the assistant's call and the tool result."""
    first = client.chat.completions.create(model="dsv32-tiny", messages=USER, tools=[WEATHER_TOOL], max_tokens=5,
                                           extra_body=FIXED)
    assert first.choices[0].finish_reason in ("length", "tool_calls")
    history = [*USER,
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_0123456789abcdef01234567", "type": "function",
                    "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
               {"role": "tool", "tool_call_id": "call_0123456789abcdef01234567", "content": "sunny, 21C"}]
    second = client.chat.completions.create(model="dsv32-tiny", messages=history, tools=[WEATHER_TOOL],
                                            max_tokens=5, extra_body={**FIXED, "chat_template_kwargs":
                                                                      {"thinking": True}})
    assert second.usage.completion_tokens == 5
    # After a tool result in thinking mode the answer starts inside reasoning (sglang#17551).
    assert second.choices[0].message.model_extra["reasoning_content"]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_forced_tool_choice_never_leaks_markup(client: openai.OpenAI, tool_choice: object) -> None:
    response = client.chat.completions.create(model="dsv32-tiny", messages=USER, tools=[WEATHER_TOOL],
                                              tool_choice=tool_choice, max_tokens=6, extra_body=FIXED)
    message = response.choices[0].message
    assert "DSML" not in (message.content or "")
    if message.tool_calls:
        assert response.choices[0].finish_reason in ("tool_calls", "length")


def test_tool_choice_none_with_tools(client: openai.OpenAI) -> None:
    response = client.chat.completions.create(model="dsv32-tiny", messages=USER, tools=[WEATHER_TOOL],
                                              tool_choice="none", max_tokens=3, extra_body=FIXED)
    assert response.choices[0].message.tool_calls is None


# ---------------------------------------------------------------------------------------------------- completions


def test_completions_with_logprobs(client: openai.OpenAI) -> None:
    response = client.completions.create(model="dsv32-tiny", prompt="The capital of France is", max_tokens=5,
                                         logprobs=2, extra_body=FIXED)
    choice = response.choices[0]
    assert response.object == "text_completion" and choice.finish_reason == "length"
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 5
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == sorted(logprobs.text_offset) and logprobs.text_offset[0] == 0
    for chosen, token, top in zip(logprobs.token_logprobs, logprobs.tokens, logprobs.top_logprobs, strict=True):
        assert chosen <= 0 and 2 <= len(top) <= 3 and top[token] == chosen
    assert response.usage.completion_tokens == 5


def test_logprobs_up_to_the_configured_limit(client: openai.OpenAI) -> None:
    response = client.completions.create(model="dsv32-tiny", prompt="Hi", max_tokens=2, logprobs=MAX_LOGPROBS,
                                         extra_body=FIXED)
    assert all(len(top) >= MAX_LOGPROBS for top in response.choices[0].logprobs.top_logprobs)
    chat = client.chat.completions.create(model="dsv32-tiny", messages=USER, max_tokens=2, logprobs=True,
                                          top_logprobs=25, extra_body=FIXED)
    assert all(len(position.top_logprobs) == 25 for position in chat.choices[0].logprobs.content)


def test_completions_echo_scores_the_prompt(client: openai.OpenAI, http: httpx.Client) -> None:
    prompt = "One two three four"
    ids = http.post("/tokenize", json={"prompt": prompt}).json()["tokens"]
    scored = client.completions.create(model="dsv32-tiny", prompt=prompt, max_tokens=0, echo=True, logprobs=1)
    choice = scored.choices[0]
    assert choice.text == prompt and choice.finish_reason == "length"
    assert len(choice.logprobs.tokens) == len(ids)
    assert choice.logprobs.token_logprobs[0] is None and all(lp <= 0 for lp in choice.logprobs.token_logprobs[1:])
    assert scored.usage.completion_tokens == 0 and scored.usage.prompt_tokens == len(ids)

    echoed = client.completions.create(model="dsv32-tiny", prompt=prompt, max_tokens=3, echo=True, extra_body=FIXED)
    assert echoed.choices[0].text.startswith(prompt) and len(echoed.choices[0].text) > len(prompt)


def test_completions_batch_and_token_prompts(client: openai.OpenAI, http: httpx.Client) -> None:
    ids = http.post("/tokenize", json={"prompt": "Hello"}).json()["tokens"]
    response = client.completions.create(model="dsv32-tiny", prompt=[ids, ids + ids], max_tokens=2, n=2,
                                         extra_body=FIXED)
    assert [c.index for c in response.choices] == [0, 1, 2, 3]
    assert response.usage.prompt_tokens == 3 * len(ids) and response.usage.completion_tokens == 8


def test_completions_stream_with_usage(client: openai.OpenAI) -> None:
    chunks = list(client.completions.create(model="dsv32-tiny", prompt=["a", "b"], max_tokens=4, stream=True,
                                            stream_options={"include_usage": True}, extra_body=FIXED))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8
    finished = sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason)
    assert finished == [0, 1]


def test_prefix_cache_hits_show_in_usage(client: openai.OpenAI, server: ServerProcess) -> None:
    long_prompt = "word " * 200  # spans several 64-token blocks
    client.completions.create(model="dsv32-tiny", prompt=long_prompt, max_tokens=1)
    again = client.completions.create(model="dsv32-tiny", prompt=long_prompt, max_tokens=1)
    assert again.usage.prompt_tokens_details.cached_tokens >= 128
    assert server.metrics()["vllm:prefix_cache_hits_total"] >= 128


# ---------------------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"model": "gpt-4", "messages": USER}, 404, "The model `gpt-4` does not exist."),
    ({"messages": USER, "temperature": "hot"}, 400, "temperature"),
    ({"messages": USER, "max_tokens": MAX_MODEL_LEN}, 400, "maximum context length"),
    ({"messages": USER, "max_completion_tokens": 10**6}, 400, "maximum context length"),
    ({"messages": USER, "n": MAX_NUM_SEQS + 1}, 400, "max_num_seqs"),
    ({"messages": USER, "stream_options": {"include_usage": True}}, 400, "stream=True"),
    ({"messages": USER, "top_logprobs": 2}, 400, "logprobs"),
    ({"messages": USER, "logprobs": True, "top_logprobs": 50}, 400, "max_logprobs"),
    ({"messages": USER, "tools": []}, 400, "tools"),
    ({"messages": USER, "tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "maybe"}}}]},
     400, "JSON Schema"),
    ({"messages": USER, "tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "x"}}},
     400, "has not been passed"),
    ({"messages": USER, "tool_choice": "required"}, 400, "tools"),
    ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, "must end with a user"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
     "image_url"),
    ({"messages": USER, "chat_template_kwargs": {"thinking": "yes"}}, 400, "true or false"),
    ({"messages": USER, "logit_bias": {"99999999": 5}}, 400, "outside the vocabulary"),
    ({"messages": USER, "temperature": -1}, 400, "temperature"),
    ({"messages": USER, "top_p": 0}, 400, "top_p"),
    ({"messages": USER, "stop_token_ids": [-1]}, 400, "stop_token_ids"),
    ({"messages": USER, "stop": ["ok", ""]}, 400, "empty string"),
    ({}, 400, "messages"),
])
def test_chat_errors(http: httpx.Client, body: dict, status: int, needle: str) -> None:
    error = error_of(http.post("/v1/chat/completions", json=body), status)
    assert needle in error["message"]


def test_stream_errors_are_http_errors_not_sse(http: httpx.Client) -> None:
    body = {"messages": USER, "max_tokens": MAX_MODEL_LEN, "stream": True}
    error = error_of(http.post("/v1/chat/completions", json=body), 400)
    assert "maximum context length" in error["message"]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"prompt": "x", "model": "nope"}, 404, "does not exist"),
    ({"prompt": [MAX_MODEL_LEN * 200]}, 400, "outside the vocabulary"),
    ({"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ({"prompt": "x", "logprobs": MAX_LOGPROBS + 1}, 400, "max_logprobs=30"),
    ({"prompt": "x", "max_tokens": MAX_MODEL_LEN}, 400, "maximum context length"),
    ({"prompt": []}, 400, "Prompt cannot be empty"),
    ({"prompt": ""}, 400, "Prompt cannot be empty"),
])
def test_completion_errors(http: httpx.Client, body: dict, status: int, needle: str) -> None:
    if body.get("prompt") == "":
        body = {**body, "add_special_tokens": False}
    error = error_of(http.post("/v1/completions", json=body), status)
    assert needle in error["message"]


def test_invalid_json_and_unknown_route(http: httpx.Client) -> None:
    error = error_of(http.post("/v1/chat/completions", content=b'{"messages": [', headers={
        "content-type": "application/json"}), 400)
    assert "Invalid JSON" in error["message"]
    error_of(http.get("/v1/nothing-here"), 404)
    error_of(http.post("/detokenize", json={"tokens": [10**9]}), 400)
    error_of(http.get("/v1/models/unknown"), 404)


def test_openai_sdk_raises_typed_errors(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=USER)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="dsv32-tiny", messages=USER, max_tokens=10**5)


def test_request_id_header_is_honoured(http: httpx.Client) -> None:
    response = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                         headers={"X-Request-Id": "my-trace-7"})
    assert "my-trace-7" in response.headers["x-request-id"] and "my-trace-7" in response.json()["id"]


def test_metrics_after_traffic(server: ServerProcess) -> None:
    values = server.metrics()
    assert values["vllm:request_success_total{finished_reason=length}"] >= 1
    assert values["vllm:time_to_first_token_seconds_count"] >= 1
    assert values["vllm:generation_tokens_total"] >= 1 and values["vllm:prompt_tokens_total"] >= 1
    assert values["vllm:num_requests_running"] == 0


def test_prompts_stay_out_of_the_logs(server: ServerProcess) -> None:
    log = server.log()
    assert "prompt tokens" in log  # requests are logged ...
    assert USER[0]["content"] not in log and "The capital of France" not in log  # ... but not their text
