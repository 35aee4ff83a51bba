"""The decode thread's hand-over to the event loop, without a GPU: per token or per step.

    python -m benchmarks.handover_bench [--rows 32] [--step-ms 10] [--steps 200]

A worker thread stands in for the decode loop: each step it waits ``--step-ms`` with the GIL
released (the GPU computing), then hands every row's new text to the event loop, where each
row's consumer spends ``--chunk-us`` of Python on it (as the service's previews do). Printed per
switch interval and way of handing over: ms a step beyond the wait, and event-loop wake-ups.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from engine.backends.jobs import Outbox

END = object()


def _busy(seconds: float) -> None:
    """Python holding the GIL for ``seconds``."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


async def _run(rows: int, steps: int, step_s: float, chunk_s: float,
               batched: bool) -> tuple[float, int]:
    loop = asyncio.get_running_loop()
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in range(rows)]
    outbox = Outbox()
    wakeups = 0
    plain = loop.call_soon_threadsafe

    def counted(callback: Callable[..., Any], *args: Any) -> Any:
        nonlocal wakeups
        wakeups += 1
        return plain(callback, *args)

    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    emits = [outbox.sender(loop, q.put_nowait) if batched
             else (lambda item, q=q: loop.call_soon_threadsafe(q.put_nowait, item))
             for q in queues]

    def worker() -> None:
        for step in range(steps + 1):
            time.sleep(step_s)  # the GPU's time, GIL released
            for emit in emits:
                emit(END if step == steps else "字")
            if batched:
                outbox.send()

    async def consume(queue: asyncio.Queue[Any]) -> None:
        while await queue.get() is not END:
            _busy(chunk_s)

    started = time.perf_counter()
    thread = threading.Thread(target=worker)
    thread.start()
    await asyncio.gather(*(consume(q) for q in queues))
    thread.join()
    loop.call_soon_threadsafe = plain  # type: ignore[method-assign]
    return (time.perf_counter() - started) / (steps + 1) - step_s, wakeups


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--step-ms", type=float, default=10.0)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--chunk-us", type=float, default=200.0,
                        help="Python the event loop spends on each chunk (previews, output stage)")
    args = parser.parse_args(argv)
    print("| switch interval | hand-over | ms a step beyond the GPU's | loop wake-ups |")
    print("| --- | --- | --- | --- |")
    for interval in (0.005, 0.001):
        sys.setswitchinterval(interval)
        for batched in (False, True):
            extra, wakeups = asyncio.run(_run(args.rows, args.steps, args.step_ms / 1000,
                                              args.chunk_us / 1e6, batched))
            print(f"| {interval * 1000:g} ms | {'per step' if batched else 'per token'} "
                  f"| {extra * 1000:.2f} | {wakeups} |", flush=True)


if __name__ == "__main__":
    main()
