"""``EngineCoreLoop`` over a real ``EngineCore`` whose model is a fake: a step takes milliseconds and its tokens are
known in advance (greedy: the token after the last one). What the loop reports per iteration: add, step and finish;
abort (and ``Shutdown`` aborting what is left); deltas (each report brings only the new tokens, the prompt only in
the first, the finish reason at the end); ``n > 1``; and errors of one request (refused when added, failing while
added, failing in its output processing) ending that request alone while the others finish.

The loop runs in a thread, but every command after the first is sent from its ``emit`` callback, on the loop's own
thread, in reaction to a report: each run is deterministic (which commands land in which iteration).
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch

from dsv32 import SamplingParams
from dsv32.config import EngineConfig, ModelConfig, tiny_config
from dsv32.engine import core as core_module
from dsv32.engine.core import EngineCore
from dsv32.engine.core_loop import EngineCoreLoop
from dsv32.engine.executor import Executor
from dsv32.engine.messages import AbortRequest, AddRequest, Command, Shutdown, StepOutputs, UtilityCall
from dsv32.engine.outputs import RequestOutput
from dsv32.model.batch import ForwardBatch
from dsv32.tokenizer import Tokenizer

# Decoding this token fails: it stands in for any bug a request's output processing can run into.
POISON = 50_000
# A token the fake model refuses to compute: an error of the model step itself.
CRASH = 60_000
# The fake model's logit for the likely next tokens (every other token: 0): sampling at temperature 1 picks one of
# them, all but surely (e^-30 odds per other token).
PEAK = 30.0
BLOCK_SIZE = 16


class FakeModel:
    """Deterministic logits without a network: after token ``t`` the tokens ``t + 1`` and ``t + 2`` are equally
    likely, all others are not (greedy takes ``t + 1``; sampling picks one of the two)."""

    def __init__(self, config: ModelConfig) -> None:
        self.config = config
        self.dtype = torch.float32

    def kv_cache_bytes_per_token(self, kv_cache_dtype: str) -> int:
        return 1024  # sizes a small cache; nothing is stored

    def allocate_kv_cache(self, num_blocks: int, block_size: int, kv_cache_dtype: str) -> None:
        return None

    def capture_decode_graphs(self, kv_cache: None) -> tuple[int, ...]:
        return ()  # runs eagerly

    def weight_bytes(self) -> int:
        return 0  # no weights

    def __call__(self, batch: ForwardBatch, kv_cache: None) -> torch.Tensor:
        if CRASH in batch.input_ids.tolist():
            raise RuntimeError("the model step failed")
        return batch.input_ids.clone()  # the "hidden state" of a token is the token

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(len(hidden), self.config.vocab_size)
        rows = torch.arange(len(hidden))
        for offset in (1, 2):
            logits[rows, (hidden + offset) % self.config.vocab_size] = PEAK
        return logits


class FakeExecutor(Executor):
    def __init__(self, model_config: ModelConfig) -> None:
        self.model = FakeModel(model_config)

    def close(self) -> None:
        """Nothing was started."""


class PoisonedTokenizer:
    """The real tokenizer, except that decoding ``POISON`` raises."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tokenizer, name)

    def decode(self, token_ids: list[int], **kwargs: Any) -> str:
        if POISON in token_ids:
            raise RuntimeError("cannot decode the poison token")
        return self._tokenizer.decode(token_ids, **kwargs)


@pytest.fixture(scope="module")
def core() -> Iterator[EngineCore]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(core_module, "make_executor", lambda engine_config, model_config, *_: FakeExecutor(model_config))
        engine = EngineCore(EngineConfig(device="cpu", max_model_len=256, max_num_seqs=8, max_num_batched_tokens=64,
                                         block_size=BLOCK_SIZE), model_config=tiny_config())
    # Detokenizers are made per request, from the core's tokenizer: poisoning it here reaches every request.
    engine.tokenizer = PoisonedTokenizer(engine.tokenizer)
    yield engine
    engine.close()


@pytest.fixture(autouse=True)
def leaves_the_core_idle(core: EngineCore) -> Iterator[None]:
    core.reset_prefix_cache()
    yield
    assert not core.has_unfinished_requests()
    assert core.block_manager.num_free_blocks == core.block_manager.num_blocks


React = Callable[[StepOutputs, Callable[[Command], None]], None]


def run_loop(core: EngineCore, first: list[Command], react: React | None = None) -> list[StepOutputs]:
    """Run the loop with the ``first`` commands queued; after each report, ``react`` may send more. Once the core is
    idle and nothing more was sent, ``Shutdown`` is. Returns every report, the one ``Shutdown`` made included."""
    commands: queue.SimpleQueue[Command] = queue.SimpleQueue()
    reports: list[StepOutputs] = []

    def emit(report: StepOutputs) -> None:
        reports.append(report)
        if react is not None:
            react(report, commands.put)
        if not core.has_unfinished_requests() and commands.empty():
            commands.put(Shutdown())

    for command in first:
        commands.put(command)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            EngineCoreLoop(core, commands, emit).run()
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout=60)
    assert not thread.is_alive(), "the loop did not stop"
    if errors:
        raise errors[0]
    return reports


def outputs_of(reports: list[StepOutputs], request_id: str) -> list[RequestOutput]:
    return [out for report in reports for out in report.outputs if out.request_id == request_id]


def add(request_id: str, prompt: list[int], **params: Any) -> AddRequest:
    return AddRequest(request_id, prompt, SamplingParams(**params))


def test_a_request_streams_one_delta_per_step_and_finishes(core: EngineCore) -> None:
    prompt = [1000, 1001, 1002]
    reports = run_loop(core, [add("r", prompt, temperature=0.0, max_tokens=4, ignore_eos=True, logprobs=1,
                                  prompt_logprobs=1)])
    deltas = outputs_of(reports, "r")
    assert reports[0].num_seqs_added == 1 and not any(report.failures for report in reports)
    # The prompt fits one step, which also samples the first token: four steps, one new token each.
    assert [delta.outputs[0].token_ids for delta in deltas] == [[1003], [1004], [1005], [1006]]
    assert [len(delta.outputs[0].logprobs) for delta in deltas] == [1, 1, 1, 1]
    assert "".join(delta.outputs[0].text for delta in deltas) == core.tokenizer.decode([1003, 1004, 1005, 1006])
    # The prompt and its logprobs go out with the first delta only.
    assert (deltas[0].prompt_token_ids, len(deltas[0].prompt_logprobs)) == (prompt, len(prompt))
    assert all(delta.prompt_token_ids == [] and delta.prompt_logprobs == [] for delta in deltas[1:])
    assert [delta.finished for delta in deltas] == [False, False, False, True]
    assert [delta.outputs[0].finish_reason for delta in deltas] == [None, None, None, "length"]
    # The core forgot it: the report after the last step has no output for it, and the stats say so.
    assert reports[-1].outputs == [] and reports[-1].stats.num_running == 0
    assert reports[-1].stats.generation_tokens_total - reports[0].stats.generation_tokens_total == 3


def test_a_stop_token_ends_the_request_with_its_reason(core: EngineCore) -> None:
    deltas = outputs_of(run_loop(core, [add("r", [2000], temperature=0.0, max_tokens=10, stop_token_ids=[2003])]),
                        "r")
    assert [delta.outputs[0].token_ids for delta in deltas] == [[2001], [2002], [2003]]
    last = deltas[-1].outputs[0]
    assert deltas[-1].finished and (last.finish_reason, last.stop_reason) == ("stop", 2003)
    # The stop token itself is not text.
    assert "".join(delta.outputs[0].text for delta in deltas) == core.tokenizer.decode([2001, 2002])


def test_abort_ends_one_request_and_shutdown_aborts_the_rest(core: EngineCore) -> None:
    long = {"temperature": 0.0, "max_tokens": 100, "ignore_eos": True}

    def react(report: StepOutputs, send: Callable[[Command], None]) -> None:
        step = len(seen)
        seen.append(report)
        if step == 1:
            send(AbortRequest("a"))
            send(AbortRequest("unknown"))  # nothing to abort: no output, no failure
        elif step == 3:
            send(Shutdown())

    seen: list[StepOutputs] = []
    reports = run_loop(core, [add("a", [3000], **long), add("b", [4000], **long)], react)
    a, b = outputs_of(reports, "a"), outputs_of(reports, "b")
    # Aborted in the third iteration, before it stepped: two tokens, then a final delta with nothing new.
    assert [delta.outputs[0].token_ids for delta in a] == [[3001], [3002], []]
    assert a[-1].finished and a[-1].outputs[0].finish_reason == "abort"
    # "b" went on until Shutdown aborted it, in an iteration that ran no step.
    assert [delta.outputs[0].token_ids for delta in b] == [[4001], [4002], [4003], [4004], []]
    assert b[-1].finished and b[-1].outputs[0].finish_reason == "abort"
    assert len(reports) == 5 and not any(report.failures for report in reports)


def test_n_completions_are_in_every_delta_until_the_last(core: EngineCore) -> None:
    params = {"n": 4, "temperature": 1.0, "seed": 3, "max_tokens": 6, "stop_token_ids": [5003]}
    deltas = outputs_of(run_loop(core, [add("n", [5000], **params)]), "n")
    assert all([completion.index for completion in delta.outputs] == [0, 1, 2, 3] for delta in deltas)
    assert [delta.finished for delta in deltas] == [False] * (len(deltas) - 1) + [True]
    answers = {}
    for index in range(4):
        completions = [delta.outputs[index] for delta in deltas]
        tokens = [token for completion in completions for token in completion.token_ids]
        answers[index] = tokens
        # Each step adds 1 or 2 to the last token (the fake model's two choices).
        assert all(b - a in (1, 2) for a, b in zip([5000, *tokens], tokens, strict=False))
        # Once a completion finished, later deltas still carry it, with nothing new and the same reason.
        done = next(i for i, completion in enumerate(completions) if completion.finished)
        assert all(not c.token_ids and c.finish_reason == completions[done].finish_reason
                   for c in completions[done + 1:])
        expected = ("stop", 5003) if 5003 in tokens else ("length", None)
        assert (completions[-1].finish_reason, completions[-1].stop_reason) == expected
    # The siblings sampled apart (each its own seed), and this seed sends some through the stop token, some past it.
    assert len({tuple(tokens) for tokens in answers.values()}) > 1
    assert {completion.finish_reason for completion in deltas[-1].outputs} == {"stop", "length"}
    # Seeded: the same request samples the same answers again.
    again = outputs_of(run_loop(core, [add("n", [5000], **params)]), "n")
    assert [[t for d in again for t in d.outputs[i].token_ids] for i in range(4)] == list(answers.values())


def test_errors_of_one_request_fail_it_alone(core: EngineCore) -> None:
    greedy = {"temperature": 0.0, "max_tokens": 5, "ignore_eos": True}
    first = [
        add("ok", [6000], **greedy),
        add("outside-vocab", [tiny_config().vocab_size], **greedy),  # refused by the core: a 400
        add("poisoned-prompt", [POISON], **greedy),  # a bug met while adding it: a 500
        add("poisoned-output", [POISON - 2], **greedy),  # its second token cannot be decoded
        UtilityCall(1, "shutdown"),  # not a method a client may call
    ]

    def react(report: StepOutputs, send: Callable[[Command], None]) -> None:
        if not seen:
            send(add("ok", [7000], **greedy))  # a duplicate of a running id is refused; the running one goes on
            send(UtilityCall(2, "reset_prefix_cache"))  # refused (False) while blocks are in use
        seen.append(report)

    seen: list[StepOutputs] = []
    reports = run_loop(core, first, react)
    failures = {failure.request_id: failure for report in reports for failure in report.failures}
    assert failures["outside-vocab"].invalid and "outside the vocabulary" in failures["outside-vocab"].message
    assert not failures["poisoned-prompt"].invalid
    assert "could not add the request: RuntimeError: cannot decode" in failures["poisoned-prompt"].message
    assert not failures["poisoned-output"].invalid
    assert "failed on request poisoned-output: cannot decode" in failures["poisoned-output"].message
    assert failures["ok"].invalid and "already running" in failures["ok"].message
    # Failed requests report no output past the failure (their blocks are freed: see leaves_the_core_idle).
    assert [delta.outputs[0].token_ids for delta in outputs_of(reports, "poisoned-output")] == [[POISON - 1]]
    assert outputs_of(reports, "outside-vocab") == outputs_of(reports, "poisoned-prompt") == []
    # The failures are reported in the iterations where they happened, next to the others' outputs.
    assert [failure.request_id for failure in reports[0].failures] == ["outside-vocab", "poisoned-prompt"]
    assert [failure.request_id for failure in reports[1].failures] == ["ok", "poisoned-output"]
    ok = outputs_of(reports, "ok")
    assert [token for delta in ok for token in delta.outputs[0].token_ids] == [6001, 6002, 6003, 6004, 6005]
    assert ok[-1].finished and ok[-1].outputs[0].finish_reason == "length"
    unknown, = reports[0].utility_results
    assert unknown[0] == 1 and isinstance(unknown[1], ValueError) and "unknown engine method" in str(unknown[1])
    assert reports[1].utility_results == [(2, False)]


def test_an_error_of_the_step_itself_ends_the_loop(core: EngineCore) -> None:
    with pytest.raises(RuntimeError, match="the model step failed"):
        run_loop(core, [add("crash", [CRASH], temperature=0.0, max_tokens=2)])
    # The owner takes the engine-death path and aborts what is left (AsyncLLM does this).
    core.abort_request("crash")
