"""AsyncLLM (what the server drives): delta streaming, stop-string hold-back, abort, overload, errors."""

import asyncio
import copy
import threading

import pytest

from dsv32 import SamplingParams
from dsv32.engine.async_engine import AsyncLLM
from dsv32.engine.client import EngineDeadError, EngineOverloadedError, RequestFailedError

from .conftest import token_prompts


@pytest.fixture
def engine(v32):
    """An AsyncLLM over the shared tiny V3.2 core (its thread only touches the core while the test runs)."""
    async_llm = AsyncLLM(v32.engine)
    yield async_llm
    asyncio.run(async_llm.shutdown())


async def collect(engine, prompt_ids, params, request_id):
    return [out async for out in engine.generate(prompt_ids, params, request_id)]


def fold(outs):
    """The whole answer of a request's deltas (the deltas themselves stay as they were)."""
    whole = copy.deepcopy(outs[0])
    for out in outs[1:]:
        whole.add(out)
    return whole


async def wait_until_idle(engine):
    for _ in range(500):
        stats = engine.stats()
        if stats.num_running == stats.num_waiting == 0 and stats.num_free_blocks == stats.num_total_blocks:
            return
        await asyncio.sleep(0.01)
    pytest.fail("the engine did not free the aborted request")


def test_streamed_deltas_add_up_to_the_offline_answer(engine, v32):
    prompt = token_prompts([30], seed=20)[0]["prompt_token_ids"]
    params = SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True, logprobs=0)
    outs = asyncio.run(collect(engine, prompt, params, "stream-1"))
    # One delta per step (several merged if the consumer fell behind): each brings new tokens and their logprobs.
    assert all(o.outputs[0].token_ids and len(o.outputs[0].logprobs) == len(o.outputs[0].token_ids) for o in outs)
    assert [o.finished for o in outs] == [False] * (len(outs) - 1) + [True]
    assert outs[0].prompt_token_ids == prompt and all(o.prompt_token_ids == [] for o in outs[1:])
    whole = fold(outs)
    final = whole.outputs[0]
    assert final.finish_reason == "length" and len(final.token_ids) == 5 and len(final.logprobs) == 5
    asyncio.run(engine.shutdown())  # the engine thread must be done with the shared core before it runs offline
    offline = v32.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0]
    assert final.token_ids == offline.token_ids and final.text == offline.text


def test_streamed_text_never_shows_part_of_a_stop_string(engine, v32):
    prompt = token_prompts([12], seed=21)[0]["prompt_token_ids"]
    free = v32.generate([{"prompt_token_ids": prompt}], SamplingParams(temperature=0.0, max_tokens=10,
                                                                      ignore_eos=True), use_tqdm=False)[0]
    text = free.outputs[0].text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    expected = text[:text.find(stop)]
    params = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, stop=[stop])
    outs = asyncio.run(collect(engine, prompt, params, "stop-1"))
    assert fold(outs).outputs[0].text == expected and outs[-1].outputs[0].finish_reason == "stop"
    for streamed in range(1, len(outs) + 1):  # a held-back tail never leaks, even partially
        assert expected.startswith(fold(outs[:streamed]).outputs[0].text)


def test_n_completions_stream_together(engine):
    prompt = token_prompts([20], seed=22)[0]["prompt_token_ids"]
    params = SamplingParams(n=2, temperature=1.0, seed=3, max_tokens=3, ignore_eos=True)
    final = fold(asyncio.run(collect(engine, prompt, params, "n-2")))
    assert final.finished and [c.index for c in final.outputs] == [0, 1]
    assert all(len(c.token_ids) == 3 and c.finish_reason == "length" for c in final.outputs)


def test_abort_ends_the_stream_and_frees_blocks(engine):
    prompt = token_prompts([20], seed=23)[0]["prompt_token_ids"]
    params = SamplingParams(temperature=0.0, max_tokens=400, ignore_eos=True)

    async def run():
        outs = []
        async for out in engine.generate(prompt, params, "abort-1"):
            outs.append(out)
            if len(outs) == 2:
                await engine.abort("abort-1")
        await wait_until_idle(engine)
        return outs

    outs = asyncio.run(run())
    assert outs[-1].finished and outs[-1].outputs[0].finish_reason == "abort"
    assert len(fold(outs).outputs[0].token_ids) < 400


def test_leaving_the_stream_early_aborts_the_request(engine):
    prompt = token_prompts([20], seed=24)[0]["prompt_token_ids"]

    async def run():
        stream = engine.generate(prompt, SamplingParams(max_tokens=400, ignore_eos=True), "leave-1")
        await anext(stream)
        await stream.aclose()  # what a disconnected client's cancelled handler does
        await wait_until_idle(engine)

    asyncio.run(run())


def test_unvalidated_requests_fail_alone_and_duplicate_ids_are_refused(engine):
    """Callers validate (``engine.validator``); one that did not still fails alone: the engine serves on."""
    with pytest.raises(ValueError, match=r"you requested 520 tokens \(20 in the messages, 500 in the completion"):
        engine.validator.validate([5] * 20, SamplingParams(max_tokens=500))

    async def run():
        with pytest.raises(ValueError, match="cannot serve a prompt of 600 tokens"):
            await anext(engine.generate([5] * 600, SamplingParams(), "long"))
        with pytest.raises(ValueError, match="outside the vocabulary"):
            await anext(engine.generate([5, 10**9], SamplingParams(), "out-of-vocabulary"))
        first = engine.generate([5] * 20, SamplingParams(max_tokens=3), "dup")
        await anext(first)
        with pytest.raises(ValueError, match="already running"):
            await anext(engine.generate([5] * 20, SamplingParams(max_tokens=3), "dup"))
        async for _ in first:
            pass

    asyncio.run(run())


def test_full_waiting_queue_raises_overloaded(engine, monkeypatch):
    monkeypatch.setattr(engine, "engine_config", engine.engine_config.__class__(max_waiting_requests=1))
    release = threading.Event()
    monkeypatch.setattr(engine._core, "reset_prefix_cache", release.wait)

    async def run():
        blocked = asyncio.ensure_future(engine.reset_prefix_cache())  # holds the engine thread between steps
        first = engine.generate([5] * 10, SamplingParams(max_tokens=2), "queued")
        pending_first = asyncio.ensure_future(anext(first))
        await asyncio.sleep(0)
        with pytest.raises(EngineOverloadedError):
            await anext(engine.generate([5] * 10, SamplingParams(max_tokens=2), "rejected"))
        release.set()
        await blocked
        await pending_first
        async for _ in first:
            pass

    asyncio.run(run())


def test_a_failing_model_step_ends_the_engine(engine, monkeypatch):
    """A step error cannot be pinned on one request: the engine takes the death path instead of carrying on."""

    def broken(scheduled):
        raise RuntimeError("simulated device error")

    monkeypatch.setattr(engine._core.runner, "execute", broken)

    async def run():
        with pytest.raises(EngineDeadError, match="crashed"):
            await collect(engine, [5] * 10, SamplingParams(max_tokens=2), "fails")
        assert not engine.is_running
        with pytest.raises(EngineDeadError):
            await collect(engine, [5] * 10, SamplingParams(max_tokens=2), "late")
        assert engine._core.request_ids() == []  # the failed step's requests were freed

    asyncio.run(run())


def test_an_error_adding_one_request_fails_it_alone(engine, monkeypatch):
    core = engine._core
    real_add = core.structured_output.add

    def add(seq):
        if seq.request_id == "bad":
            raise AttributeError("simulated bug")
        real_add(seq)

    monkeypatch.setattr(core.structured_output, "add", add)

    async def run():
        with pytest.raises(RequestFailedError, match="simulated bug"):
            await collect(engine, [5] * 10, SamplingParams(max_tokens=2, n=2), "bad")
        outs = await collect(engine, [5] * 10, SamplingParams(max_tokens=2, ignore_eos=True), "works")
        assert outs[-1].finished and len(fold(outs).outputs[0].token_ids) == 2
        await wait_until_idle(engine)  # nothing of the refused request stayed queued

    asyncio.run(run())


def test_shutdown_aborts_running_requests(v32):
    engine = AsyncLLM(v32.engine)

    async def run():
        stream = engine.generate([5] * 10, SamplingParams(max_tokens=400, ignore_eos=True), "cut")
        await anext(stream)
        await engine.shutdown()
        rest = [out async for out in stream]
        assert rest[-1].finished and rest[-1].outputs[0].finish_reason == "abort"
        with pytest.raises(EngineDeadError):
            await anext(engine.generate([5] * 10, SamplingParams(max_tokens=2), "late"))

    asyncio.run(run())
