"""Beyond the model's capacity: whole-runtime replies under Poisson arrivals below and above
what the engine can answer, with and without ``limits.max_wait_s``.

    python -m benchmarks.overload_bench [--model-dir DIR] [--seconds 30]
                                        [--multiples 0.5,2,4] [--max-wait-s 2]

The runtime as ``vtuber-bot run`` opens it (``open_runtime``, ``ConversationService.handle``,
SQLite in a temporary folder) with the in-process engine (``TransformersBackend``,
continuous batching): the tiny test model on the CPU by default, or ``--model-dir`` (say the
Qwen3-8B-shaped model ``arrivals_bench`` prepares) on a GPU. Every message is from a new
viewer, so per-viewer rate limits never refuse one.

First the capacity: a burst of ``2 x max_batch_size`` messages with nothing else running,
replies per second. Then each load (a multiple of that capacity) runs three ways, one after
the other in the same runtime (the limits change between runs as a reload changes them):
- **unbounded**: ``max_pending`` past the run's size, ``max_wait_s`` off. Every message is
  admitted and waits its turn: past capacity the queue, and the wait, grow all run long.
- **default**: ``max_pending: 64`` (``queue_full`` beyond it), ``max_wait_s`` off.
- **max_wait_s**: ``max_pending`` unbounded again; a message that would wait longer than
  ``max_wait_s`` for a generation slot, at the pace replies finished lately, is refused at
  once (``dropped``, ``busy``), so flood control drops early instead of late.

Printed per run: answered and refused, reply p50/p95/max (offered to reply sent), and the
p95 of the messages offered in the run's first and last thirds: a queue that keeps growing
shows as a last third far slower than the first.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import random
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.arrivals_bench import prepare
from benchmarks.pipeline_bench import NullSink, _pct
from bot.config import parse_config
from bot.events import ChatEvent
from bot.paths import DataPaths
from bot.runtime import open_runtime

NEW_TOKENS = 24
POLICIES = ("unbounded", "default", "max_wait_s")


@dataclasses.dataclass
class Run:
    label: str
    outcomes: Counter[str]
    replies: list[tuple[float, float]]  # (offered at, s into the run; reply sent after, s)
    seconds: float

    def row(self) -> dict[str, Any]:
        waits = [wait for _, wait in self.replies]
        third = self.seconds / 3
        first = [wait for at, wait in self.replies if at < third]
        last = [wait for at, wait in self.replies if at >= 2 * third]
        refused = {k: v for k, v in self.outcomes.items() if k != "answered"}
        return {"run": self.label, "answered": self.outcomes["answered"],
                "refused": ", ".join(f"{k} {v}" for k, v in sorted(refused.items())) or "0",
                "p50_s": round(_pct(waits, 0.5), 2), "p95_s": round(_pct(waits, 0.95), 2),
                "max_s": round(max(waits, default=float("nan")), 2),
                "p95_first_third_s": round(_pct(first, 0.95), 2),
                "p95_last_third_s": round(_pct(last, 0.95), 2)}


def _config(model_dir: Path, device: str, batch: int, limits: dict[str, Any]) -> Any:
    return parse_config({
        "models": {"llm": {"model_path": str(model_dir), "device": device,
                           "max_batch_size": batch, "continuous_batching": "on",
                           "max_length": 1024},
                   "embedding": {"enabled": False}},
        "vtuber": {"response": {"max_tokens": NEW_TOKENS, "enable_traditional_chinese": False}},
        "store": {"remember_messages_min_chars": 0, "rag_enabled": False},
        "limits": {"user_messages_per_minute": 10_000, "reply_timeout_s": 600, **limits},
    }, env={})


def _event(index: int, sink: NullSink) -> ChatEvent:
    return ChatEvent(platform="twitch", channel_id="stream", platform_user_id=f"v{index}",
                     display_name=f"viewer {index}", text=f"佩兒 今天的星星好亮 #{index}",
                     sink=sink, message_id=f"m{index}")


async def _offer(runtime: Any, arrivals: list[float], first_index: int
                 ) -> tuple[Counter[str], list[tuple[float, float]]]:
    """Each message at its arrival time (s from now); every outcome, every reply's wait."""
    outcomes: Counter[str] = Counter()
    replies: list[tuple[float, float]] = []

    async def one(index: int, at: float) -> None:
        sink = NullSink()
        started = time.perf_counter()
        reply = await runtime.service.handle(_event(index, sink))
        key = f"{reply.status}:{reply.reason}" if reply.reason else reply.status
        outcomes[key] += 1
        if reply.status == "answered":
            replies.append((at, (sink.sent_at or time.perf_counter()) - started))

    loop = asyncio.get_running_loop()
    start = loop.time()
    tasks = []
    for offset, at in enumerate(arrivals):
        delay = start + at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one(first_index + offset, at)))
    await asyncio.gather(*tasks)
    return outcomes, replies


async def _capacity(runtime: Any, batch: int, first_index: int) -> float:
    """Replies per second with the engine full and nothing else running (the better of
    two bursts of four batches: a stray process on the machine only ever slows one)."""
    rates = []
    for index in (first_index, first_index + 4 * batch):
        started = time.perf_counter()
        outcomes, _ = await _offer(runtime, [0.0] * (4 * batch), index)
        rates.append(outcomes["answered"] / (time.perf_counter() - started))
    return max(rates)


def _limits(policy: str, max_wait_s: float) -> dict[str, Any]:
    return {"unbounded": {"max_pending": 1_000_000},
            "default": {},
            "max_wait_s": {"max_pending": 1_000_000, "max_wait_s": max_wait_s}}[policy]


async def _use_limits(runtime: Any, config: Any) -> None:
    """``config``'s limits, taken in as an operator's reload (SIGHUP) takes them."""
    runtime.reload_config = lambda: config
    refused = await runtime.reload()
    if refused is not None:
        raise SystemExit(refused)


def _arrivals(rate: float, seconds: float) -> list[float]:
    rng = random.Random(7)
    arrivals, clock = [], rng.expovariate(rate)
    while clock < seconds:
        arrivals.append(clock)
        clock += rng.expovariate(rate)
    return arrivals


async def _runs(args: argparse.Namespace) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="vtuber-overload-bench-"))
    batch = args.batch
    rows: list[dict[str, Any]] = []

    def config(policy: str) -> Any:  # a new object each time: a reload takes over its limits
        return _config(args.model_dir, args.device, batch, _limits(policy, args.max_wait_s))

    # One runtime for every run: opening one on a GPU compiles and captures its graphs, which
    # takes minutes. Each run drains before the next starts, and its viewers and message ids
    # are its own (no redeliveries, no rate limits).
    async with open_runtime(config("default"), DataPaths.resolve(folder)) as runtime:
        await _capacity(runtime, batch, 10_000_000)  # warm-up: first compiles
        capacity = await _capacity(runtime, batch, 11_000_000)
        print(f"capacity: {capacity:.1f} replies/s", flush=True)
        multiples = [float(m) for m in args.multiples.split(",")]
        for number, (multiple, policy) in enumerate(
                ((m, p) for m in multiples for p in POLICIES), start=1):
            await _use_limits(runtime, config(policy))
            rate = multiple * capacity
            outcomes, replies = await _offer(runtime, _arrivals(rate, args.seconds),
                                             number * 1_000_000)
            run = Run(f"{multiple:g} x capacity ({rate:.1f} msg/s), {policy}", outcomes,
                      replies, args.seconds)
            rows.append(run.row())
            print(rows[-1], flush=True)  # as it comes: a run cut short keeps what it had
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".bench/tiny-qwen3"),
                        help="built if missing: the tiny test model, or with --qwen3-8b "
                             "the random Qwen3-8B shape (needs a GPU)")
    parser.add_argument("--qwen3-8b", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=8, help="models.llm.max_batch_size")
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--multiples", default="0.5,2,4",
                        help="loads, as multiples of the measured capacity")
    parser.add_argument("--max-wait-s", type=float, default=2.0)
    args = parser.parse_args()
    prepare(args.model_dir, tiny=not args.qwen3_8b)
    rows = asyncio.run(_runs(args))
    keys = list(rows[0]) if rows else []
    print("\n| " + " | ".join(keys) + " |")
    print("|" + " --- |" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(row[k]) for k in keys) + " |")


if __name__ == "__main__":
    main()
