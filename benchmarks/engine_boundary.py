"""What the engine-core process boundary costs per engine step: messages per step and bytes per message with the real
engine behind `dsv32 serve`'s client, and the latency one step's outputs take to cross (pickle, pipe, unpickle: the
core's deltas go out and arrive as they are) at several batch sizes.

usage: python benchmarks/engine_boundary.py [--requests 8] [--tokens 32] [--steps 200]

Part 1 runs `MPEngineClient` on the built-in tiny model with N concurrent requests and counts the ``StepOutputs``
messages that come back. Part 2 times the CPU work the boundary adds to a step, in one process (no pipe). Part 3 sends
synthetic steps (B requests, one new token of ~4 characters each, one step every --step-ms as a model would pace
them) through the same pipe code from a child process and times each one from before it is sent to after it is
unpickled (one clock: CLOCK_MONOTONIC is system-wide on Linux). The synthetic steps are what the engine core emits:
``RequestOutput`` deltas holding only the step's new text and token; before the core emitted deltas, parts 2 and 3
also counted encoding cumulative outputs into deltas and rebuilding them on the client's side.
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import pickle
import statistics
import time
from multiprocessing.connection import Connection

from dsv32.config import EngineConfig
from dsv32.engine.messages import StepOutputs
from dsv32.engine.outputs import CompletionOutput, EngineStats, RequestOutput
from dsv32.engine.process import MPEngineClient
from dsv32.engine.sampling_params import SamplingParams

BATCH_SIZES = (1, 8, 64)
STATS = EngineStats(0, 0, 1, 1, 0.0, 0, 0, 0, 0, 0)


async def count_messages(num_requests: int, num_tokens: int) -> None:
    engine = await MPEngineClient.start(EngineConfig(max_model_len=1024, dtype="float32", device="cpu"))
    sizes: list[int] = []
    receive = engine._on_step_outputs

    def counting(step: StepOutputs) -> None:
        sizes.append(len(pickle.dumps(step, protocol=pickle.HIGHEST_PROTOCOL)))
        receive(step)

    engine._on_step_outputs = counting  # type: ignore[method-assign]
    params = SamplingParams(max_tokens=num_tokens, ignore_eos=True, temperature=0.0)

    async def one(index: int) -> int:
        outs = [out async for out in engine.generate([5 + index] * 64, params, f"r{index}")]
        return sum(len(out.outputs[0].token_ids) for out in outs)

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(num_requests))))
    elapsed = time.perf_counter() - started
    await engine.shutdown()
    print(f"part 1: {num_requests} concurrent requests x {num_tokens} tokens = {tokens} tokens in {elapsed:.2f} s; "
          f"{len(sizes)} StepOutputs messages (engine -> server), {tokens / len(sizes):.1f} tokens per message, "
          f"median {statistics.median(sizes)} bytes, max {max(sizes)} bytes per message")


def _fake_delta(request: int) -> RequestOutput:
    """A request's output of one decode step, as ``EngineCore.step`` builds it: one new token (no logprobs)."""
    return RequestOutput(f"r{request}", None, [], [CompletionOutput(0, "tok ", [7])])


def cpu_cost(batch: int, steps: int) -> None:
    """The work the boundary adds per step, without the pipe. The core's deltas cross as they are (nothing to encode
    on the engine side or to rebuild on the client's): pickle and unpickle."""
    spent = []
    for _ in range(steps):
        outputs = [_fake_delta(i) for i in range(batch)]  # what EngineCore.step builds anyway
        started = time.process_time()
        pickle.loads(pickle.dumps(StepOutputs(outputs, STATS)))
        spent.append(time.process_time() - started)
    print(f"part 2: batch {batch:3d}: pickle + unpickle = {1e3 * statistics.mean(spent):.3f} ms "
          f"CPU per step (mean over {steps} steps)")


def _send_steps(conn: Connection, batch: int, steps: int, step_s: float) -> None:
    for _ in range(steps):
        time.sleep(step_s)  # the model's step: the pipe is empty when the next step's outputs go out
        outputs = [_fake_delta(i) for i in range(batch)]  # what EngineCore.step builds anyway
        conn.send((time.monotonic(), StepOutputs(outputs, STATS)))
    conn.close()


def time_crossing(batch: int, steps: int, step_s: float) -> None:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_send_steps, args=(sender, batch, steps, step_s))
    child.start()
    sender.close()
    latencies = []
    while True:
        try:
            started, _ = receiver.recv()
        except EOFError:
            break
        latencies.append(time.monotonic() - started)
    child.join()
    latencies.sort()
    median = statistics.median(latencies)
    print(f"part 3: batch {batch:3d}: one step's outputs cross the pipe in median {1e3 * median:.3f} ms, "
          f"p90 {1e3 * latencies[int(0.9 * len(latencies))]:.3f} ms ({len(latencies)} steps)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=20.0, help="time between synthetic steps (the model's)")
    args = parser.parse_args()
    asyncio.run(count_messages(args.requests, args.tokens))
    for batch in BATCH_SIZES:
        cpu_cost(batch, args.steps)
    for batch in BATCH_SIZES:
        time_crossing(batch, args.steps, args.step_ms / 1e3)


if __name__ == "__main__":
    main()
