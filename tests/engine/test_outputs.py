"""Delta outputs: the core reports only what is new, folding the deltas (``RequestOutput.add``) gives the whole
answer the offline ``LLM`` returns, a client that fell behind merges queued deltas without losing one, and logprob
token strings are left to the reader (the engine sends ids, floats and ranks)."""

from __future__ import annotations

import asyncio
import copy

import pytest

from dsv32 import SamplingParams
from dsv32.config import EngineConfig, tiny_config
from dsv32.engine.client import QueueEngineClient
from dsv32.engine.messages import Command, StepOutputs
from dsv32.engine.outputs import (
    CompletionOutput,
    EngineStats,
    Logprob,
    RequestOutput,
    fill_decoded_tokens,
    logprob_token_text,
)
from dsv32.tokenizer import Tokenizer

from .conftest import token_prompts

STATS = EngineStats(0, 0, 1, 1, 0.0, 0, 0, 0, 0, 0)


def fold(deltas: list[RequestOutput]) -> RequestOutput:
    whole = copy.deepcopy(deltas[0])
    for delta in deltas[1:]:
        whole.add(delta)
    return whole


def stream_from_core(llm, request_id: str, prompt: list[int], params: SamplingParams) -> list[RequestOutput]:
    """Every delta the core reports for one streaming request, stepped to the end."""
    core = llm.engine
    core.reset_prefix_cache()  # cold, as the offline run it is compared with
    core.add_request(request_id, prompt, params, stream=True)
    deltas = []
    while core.has_unfinished_requests():
        deltas += core.step()
    assert not core.take_failures()
    return deltas


def free_text(llm, prompt: list[int], max_tokens: int) -> str:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    return llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0].outputs[0].text


def test_core_deltas_add_up_to_the_offline_answer(v32) -> None:
    prompt = token_prompts([40], seed=70)[0]["prompt_token_ids"]
    text = free_text(v32, prompt, 12)
    # A stop string first seen in the second half of the text: the output streams for a while, then stops.
    stop = next(text[i:i + 3] for i in range(len(text) // 2, len(text) - 3) if text.find(text[i:i + 3]) == i)
    cases = {
        # n > 1 sampled, with logprobs and prompt logprobs: siblings are in every delta, finished or not.
        "sampled": SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=6, ignore_eos=True, logprobs=2,
                                  prompt_logprobs=1),
        # A stop string: the text is cut, stop_reason names it, the finish fields are absolute in every delta.
        "stop": SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True, stop=[stop], logprobs=1),
    }
    for name, params in cases.items():
        deltas = stream_from_core(v32, f"delta-{name}", prompt, params)
        v32.engine.reset_prefix_cache()
        offline = v32.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
        assert len(deltas) > 1 and [d.finished for d in deltas] == [False] * (len(deltas) - 1) + [True]
        assert all(len(d.outputs) == params.n for d in deltas)
        # The prompt goes out once; the engine decodes no logprob strings.
        assert deltas[0].prompt_token_ids == prompt and all(d.prompt_token_ids == [] for d in deltas[1:])
        assert all(entry.decoded_token is None for d in deltas for c in d.outputs for position in c.logprobs
                   for entry in position.values())
        whole = fold(deltas)
        fill_decoded_tokens(whole, v32.get_tokenizer())
        assert whole.outputs == offline.outputs
        assert whole.prompt_logprobs == offline.prompt_logprobs
        assert (whole.finished, whole.num_cached_tokens) == (True, offline.num_cached_tokens)
        # No token, logprob entry or prompt position is reported twice.
        for index, completion in enumerate(whole.outputs):
            assert sum(len(d.outputs[index].token_ids) for d in deltas) == len(completion.token_ids)
    stopped = fold(stream_from_core(v32, "delta-stop-again", prompt, cases["stop"])).outputs[0]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop and stop not in stopped.text


def test_prompt_logprobs_are_reported_once_with_names_from_the_reader(v32) -> None:
    prompt = token_prompts([90], seed=71)[0]["prompt_token_ids"]  # longer than a chunk: computed in pieces
    params = SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True, prompt_logprobs=2)
    deltas = stream_from_core(v32, "delta-prompt", prompt, params)
    positions = [p for d in deltas for p in d.prompt_logprobs]
    assert len(positions) == len(prompt) and positions[0] is None
    offline = v32.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)[0]
    tokenizer = v32.get_tokenizer()
    for position, token_id in zip(offline.prompt_logprobs[1:], prompt[1:], strict=True):
        assert position[token_id].decoded_token == logprob_token_text(tokenizer, token_id)


def test_add_folds_deltas_into_the_cumulative_output() -> None:
    def lp(token_id: int) -> dict[int, Logprob]:
        return {token_id: Logprob(-0.1 * token_id, 1)}

    first = RequestOutput("r", "p", [1, 2], [CompletionOutput(0, "a", [3], -0.3, [lp(3)]),
                                             CompletionOutput(1, "", [], -0.0, [])],
                          prompt_logprobs=[None], num_cached_tokens=0)
    second = RequestOutput("r", None, [], [CompletionOutput(0, "bc", [4, 5], -1.2, [lp(4), lp(5)]),
                                           CompletionOutput(1, "x", [6], -0.6, [lp(6)], "stop", "x")],
                           prompt_logprobs=[lp(2)], num_cached_tokens=16)
    third = RequestOutput("r", None, [], [CompletionOutput(0, "", [7], -1.9, [lp(7)], "length"),
                                          CompletionOutput(1, "", [], -0.6, [], "stop", "x")],
                          finished=True, prompt_logprobs=[], num_cached_tokens=16)
    first.add(second)
    first.add(third)
    assert first == RequestOutput(
        "r", "p", [1, 2],
        [CompletionOutput(0, "abc", [3, 4, 5, 7], -1.9, [lp(3), lp(4), lp(5), lp(7)], "length", None),
         CompletionOutput(1, "x", [6], -0.6, [lp(6)], "stop", "x")],
        finished=True, prompt_logprobs=[None, lp(2)], num_cached_tokens=16)
    # Without logprobs or prompt logprobs asked for, they stay None.
    plain = RequestOutput("s", None, [9], [CompletionOutput(0, "a", [3])])
    plain.add(RequestOutput("s", None, [], [CompletionOutput(0, "b", [4], finish_reason="length")], finished=True))
    assert plain.outputs[0].logprobs is None and plain.prompt_logprobs is None and plain.outputs[0].text == "ab"


def test_add_takes_completions_and_lists_a_delta_brings_first() -> None:
    lp = {5: Logprob(-0.5, 1)}
    whole = RequestOutput("r", "p", [1, 2], [CompletionOutput(0, "a", [3])], prompt_logprobs=[None, lp])
    # A completion the output does not hold yet is taken as it comes; logprobs start with the first delta that has
    # them; a delta without prompt logprobs (None) leaves those reported before as they were.
    whole.add(RequestOutput("r", None, [], [CompletionOutput(1, "x", [7], -0.5, [lp]),
                                            CompletionOutput(0, "b", [4], -0.5, [lp])]))
    assert [completion.index for completion in whole.outputs] == [0, 1]
    assert whole.outputs[0] == CompletionOutput(0, "ab", [3, 4], -0.5, [lp])
    assert whole.outputs[1] == CompletionOutput(1, "x", [7], -0.5, [lp])
    assert (whole.prompt, whole.prompt_token_ids, whole.prompt_logprobs) == ("p", [1, 2], [None, lp])
    # CompletionOutput.add alone: the text and lists grow, the finish fields are the delta's.
    completion = CompletionOutput(0, "a", [3], -0.1, finish_reason=None)
    completion.add(CompletionOutput(0, "", [], -0.1, [], "stop", 8))
    assert completion == CompletionOutput(0, "a", [3], -0.1, [], "stop", 8) and completion.finished


class _RecordingClient(QueueEngineClient):
    """A client whose engine is the test: commands are recorded, outputs are fed by hand."""

    def __init__(self) -> None:
        config = EngineConfig()
        super().__init__(Tokenizer.from_pretrained("tiny"), tiny_config(), config, 1024, STATS)
        self.sent: list[Command] = []

    def _send(self, command: Command) -> None:
        self.sent.append(command)

    async def shutdown(self) -> None:
        return None


def _delta(step: int, finished: bool = False) -> RequestOutput:
    return RequestOutput("r", None, [], [CompletionOutput(0, f"t{step} ", [step], -float(step),
                                                          [{step: Logprob(-float(step), 1)}],
                                                          "length" if finished else None)],
                         finished=finished, prompt_logprobs=[{step: Logprob(-1.0, 1)}])


@pytest.mark.parametrize("queued", [1, 3])
def test_a_consumer_that_fell_behind_gets_the_queued_deltas_merged(queued: int) -> None:
    async def run() -> list[RequestOutput]:
        client = _RecordingClient()
        stream = client.generate([5, 6, 7], SamplingParams(max_tokens=8), "r")
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)  # the stream is registered and waits for its first output
        deltas = [_delta(step, finished=step == 5) for step in range(6)]
        # The consumer is slow: ``queued`` steps arrive before it reads, then the rest one by one.
        for delta in deltas[:queued]:
            client._on_step_outputs(StepOutputs([delta], STATS))
        received = [await first]
        for delta in deltas[queued:]:
            client._on_step_outputs(StepOutputs([delta], STATS))
        received += [out async for out in stream]
        return received

    expected = fold([_delta(step, finished=step == 5) for step in range(6)])
    received = asyncio.run(run())
    # What was queued when the consumer first read came as one output; nothing was lost or repeated.
    assert received[0].outputs[0].token_ids == list(range(queued))
    assert received[0].prompt_logprobs == [{step: Logprob(-1.0, 1)} for step in range(queued)]
    assert fold(received) == expected
    assert fold(received).outputs[0].text == "t0 t1 t2 t3 t4 t5 "


def test_an_error_queued_behind_deltas_ends_the_stream() -> None:
    async def run() -> None:
        client = _RecordingClient()
        stream = client.generate([5, 6, 7], SamplingParams(max_tokens=8), "r")
        first = asyncio.ensure_future(anext(stream))
        await asyncio.sleep(0)
        client._on_step_outputs(StepOutputs([_delta(0)], STATS))
        client._on_engine_dead("gone")
        with pytest.raises(Exception, match="gone"):
            await first

    asyncio.run(run())
