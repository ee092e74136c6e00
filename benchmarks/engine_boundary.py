"""What the engine-core process boundary costs per engine step: messages per step and bytes per message with the real
engine behind `dsv32 serve`'s client, and the latency one step's outputs take to cross (delta-encode, pickle, pipe,
unpickle, rebuild the cumulative outputs) at several batch sizes.

usage: python benchmarks/engine_boundary.py [--requests 8] [--tokens 32] [--steps 200]

Part 1 runs `MPEngineClient` on the built-in tiny model with N concurrent requests and counts the ``StepOutputs``
messages that come back. Part 2 times the CPU work the boundary adds to a step, in one process (no pipe). Part 3 sends
synthetic steps (B requests, one new token of ~4 characters each, one step every --step-ms as a model would pace
them) through the same pipe code from a child process and times each one from before encoding to after
``apply_delta`` (one clock: CLOCK_MONOTONIC is system-wide on Linux).
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
from dsv32.engine.messages import DeltaEncoder, StepOutputs, apply_delta
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
        return len(outs[-1].outputs[0].token_ids)

    started = time.perf_counter()
    tokens = sum(await asyncio.gather(*(one(i) for i in range(num_requests))))
    elapsed = time.perf_counter() - started
    await engine.shutdown()
    print(f"part 1: {num_requests} concurrent requests x {num_tokens} tokens = {tokens} tokens in {elapsed:.2f} s; "
          f"{len(sizes)} StepOutputs messages (engine -> server), {tokens / len(sizes):.1f} tokens per message, "
          f"median {statistics.median(sizes)} bytes, max {max(sizes)} bytes per message")


def _fake_output(request: int, length: int) -> RequestOutput:
    """A request's cumulative output after ``length`` tokens, as ``EngineCore.step`` builds it (no logprobs)."""
    completion = CompletionOutput(0, "tok " * length, [7] * length)
    return RequestOutput(f"r{request}", None, [1] * 128, [completion])


def cpu_cost(batch: int, steps: int) -> None:
    """The work the boundary adds per step, without the pipe: encode, pickle, unpickle, rebuild."""
    encoder = DeltaEncoder()
    last: dict[str, RequestOutput] = {}
    spent = []
    for length in range(1, steps + 1):
        outputs = [_fake_output(i, length) for i in range(batch)]
        started = time.process_time()
        step = pickle.loads(pickle.dumps(StepOutputs([encoder.encode(out) for out in outputs], STATS)))
        for delta in step.outputs:
            last[delta.request_id] = apply_delta(last.get(delta.request_id), delta, None, [1] * 128)
        spent.append(time.process_time() - started)
    print(f"part 2: batch {batch:3d}: encode + pickle + unpickle + rebuild = {1e3 * statistics.mean(spent):.3f} ms "
          f"CPU per step (mean over {steps} steps)")


def _send_steps(conn: Connection, batch: int, steps: int, step_s: float) -> None:
    encoder = DeltaEncoder()
    for length in range(1, steps + 1):
        time.sleep(step_s)  # the model's step: the pipe is empty when the next step's outputs go out
        outputs = [_fake_output(i, length) for i in range(batch)]  # what EngineCore.step builds anyway
        started = time.monotonic()
        step = StepOutputs([encoder.encode(out) for out in outputs], STATS)
        conn.send((started, step))
    conn.close()


def time_crossing(batch: int, steps: int, step_s: float) -> None:
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    child = context.Process(target=_send_steps, args=(sender, batch, steps, step_s))
    child.start()
    sender.close()
    last: dict[str, RequestOutput] = {}
    latencies = []
    while True:
        try:
            started, step = receiver.recv()
        except EOFError:
            break
        for delta in step.outputs:
            last[delta.request_id] = apply_delta(last.get(delta.request_id), delta, None, [1] * 128)
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
