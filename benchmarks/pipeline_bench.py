"""Conversation pipeline under chat load: scripted backend (so the LLM is not the bottleneck),
SQLite in a temporary folder, this machine's CPU.

    python -m benchmarks.pipeline_bench [--rate 2000] [--seconds 30] [--viewers 2000]
                                        [--limit max_overhead_ms=3] [--known-viewers 0]
                                        [--store-url postgresql+asyncpg://...]

Run it from any checkout of the project (an older one too, for the baseline in the same run):
it only uses ``open_runtime``, ``ConversationService.handle`` and the store.

Printed: every message's final state, admitted-message latency (admission to reply, the
scripted backend answers at once), event-loop lag (responsiveness), CPU per message, RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import inspect
import os
import resource
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bot.config import parse_config
from bot.events import ChatEvent
from bot.paths import DataPaths
from bot.runtime import open_runtime


class NullSink:
    sent_at: float | None = None  # when the reply (or a fallback) went out

    async def send(self, text: str) -> str:
        self.sent_at = time.perf_counter()
        return "x"

    async def edit(self, message_id: str, text: str) -> None:
        return None

    async def typing(self) -> None:
        return None


_FIELDS = {f.name for f in dataclasses.fields(ChatEvent)}
_USER_FIELD = "platform_user_id" if "platform_user_id" in _FIELDS else "user_id"


def _event(index: int, viewer: int, sink: NullSink) -> ChatEvent:
    return ChatEvent(**{"platform": "twitch", "channel_id": "stream",
                        _USER_FIELD: f"v{viewer}",
                        "display_name": f"viewer {viewer}", "text": f"佩兒 你好 #{index}",
                        "sink": sink, "message_id": f"m{index}"})


IDLE_WINDOW_S = 2.0
TRANSIENT_S = 1.0


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


async def _lag_probe(stop: asyncio.Event, lags: list[float]) -> None:
    """How late a 10 ms timer fires: the event loop's responsiveness."""
    loop = asyncio.get_running_loop()
    while not stop.is_set():
        started = loop.time()
        await asyncio.sleep(0.01)
        lags.append(loop.time() - started - 0.01)


def _thread_cpu_s() -> Counter[str]:
    """CPU seconds so far per thread name (``/proc``): the event loop vs the store threads."""
    per_thread: Counter[str] = Counter()
    ticks = os.sysconf("SC_CLK_TCK")
    for task in Path("/proc/self/task").iterdir():
        try:
            name = (task / "comm").read_text().strip()
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # the thread ended meanwhile
            continue
        kind = "event loop" if task.name == str(os.getpid()) else name.rstrip("0123456789_")
        per_thread[kind] += (int(fields[11]) + int(fields[12])) / ticks
    return per_thread


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def _offer(runtime: Any, rate: float, seconds: float, viewers: int
                 ) -> tuple[Counter[str], list[tuple[float, float, float]], float]:
    """Offer ``rate`` msg/s; count each outcome as it comes (holding 60,000 finished tasks
    and replies would make the benchmark's own memory the RSS being measured).

    Per answered message: when it was offered (seconds into the run), how long until its
    reply was sent (what the viewer waits for), and until ``handle()`` returned (the reply
    and the state change recorded too)."""
    answered: list[tuple[float, float, float]] = []
    outcomes: Counter[str] = Counter()
    running: set[asyncio.Task[None]] = set()

    async def one(index: int) -> None:
        sink = NullSink()
        started = time.perf_counter()
        try:
            reply = await runtime.service.handle(_event(index, index % viewers, sink))
        except Exception:  # noqa: BLE001 - counted: handle() must never raise
            outcomes["raised"] += 1
            return
        if reply.status == "answered":
            done = time.perf_counter()
            answered.append((index / rate, (sink.sent_at or done) - started, done - started))
        outcomes[f"{reply.status}:{reply.reason}" if reply.reason else reply.status] += 1

    loop = asyncio.get_running_loop()
    start = loop.time()
    total = int(rate * seconds)
    for index in range(total):
        due = start + index / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(index))
        running.add(task)
        task.add_done_callback(running.discard)
    offered_for = loop.time() - start
    while running:
        await asyncio.wait(set(running))
    return outcomes, answered, offered_for


async def _warm_up(runtime: Any) -> None:
    """Answer a few messages first, so one-time costs (lazy imports, the OpenCC converter,
    statement compilation) stay out of the steady-state numbers; not counted below."""
    sink = NullSink()
    for index in range(5):
        event = dataclasses.replace(_event(index, index, sink), platform="warmup")
        await runtime.service.handle(event)


async def _add_known_viewers(runtime: Any, count: int) -> None:
    """A channel with a past: ``count`` viewers already in the store (none of them the
    flood's), so lookups that grow with the audience show."""
    if not count:  # older checkouts lack what is imported below
        return
    from memory.models import utcnow
    from memory.store import statements as sql

    now = utcnow()
    for start in range(0, count, 10_000):
        keys = [f"known{i}" for i in range(start, min(count, start + 10_000))]

        def add(connection: Any, keys: list[str] = keys) -> None:
            ids = list(connection.scalars(sql.INSERT_USERS, [
                {"display_name": key, "created_at": now} for key in keys]))
            connection.execute(sql.claim_identities(runtime.store.database.dialect), [
                {"user_id": user_id, "platform": "twitch", "platform_user_id": key,
                 "display_name": key, "created_at": now}
                for key, user_id in zip(keys, ids, strict=True)])

        await runtime.store.database.write_unit(add)


async def _stored_states(runtime: Any) -> Counter[str]:
    from sqlalchemy import text

    store = runtime.store
    session_cm = (store.database.read() if hasattr(store, "database")
                  else store._sessions.begin())  # older checkouts
    async with session_cm as session:
        rows = await session.execute(text(
            "SELECT status, COUNT(*) FROM messages WHERE role = 'user' AND platform != 'warmup'"
            " GROUP BY status"))
        return Counter({status: count for status, count in rows})


async def scenario(rate: float, seconds: float, viewers: int, store_url: str | None = None,
                   limits: dict[str, float] | None = None,
                   known_viewers: int = 0) -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="vtuber-pipeline-bench-"))
    store: dict[str, Any] = {"remember_messages_min_chars": 0, "rag_enabled": False}
    if store_url:  # an empty PostgreSQL database, say (the bot process's CPU is measured)
        store["url"] = store_url
    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": ["收到～"]}},
                   "embedding": {"enabled": False}},
        "store": store,
        **({"limits": limits} if limits else {}),
    }, env={})
    gc.collect()
    rss_before = _rss_mb()
    # As ``vtuber-bot run`` opens it, in checkouts that know how.
    options = ({"freeze_heap": True}
               if "freeze_heap" in inspect.signature(open_runtime).parameters else {})
    async with open_runtime(config, DataPaths.resolve(folder), **options) as runtime:
        await _add_known_viewers(runtime, known_viewers)
        await _warm_up(runtime)
        stop, lags = asyncio.Event(), []
        probe = asyncio.create_task(_lag_probe(stop, lags))
        idle_before = time.process_time()
        await asyncio.sleep(IDLE_WINDOW_S)  # the idle cost: the lag probe, the loop itself
        idle_cpu_per_s = (time.process_time() - idle_before) / IDLE_WINDOW_S
        lags.clear()
        cpu_before = time.process_time()
        threads_before = _thread_cpu_s()
        wall_before = time.perf_counter()
        outcomes, answered, offered_for = await _offer(runtime, rate, seconds, viewers)
        if hasattr(runtime.service, "flush"):
            await runtime.service.flush()
        drained = time.perf_counter() - wall_before
        cpu = time.process_time() - cpu_before
        by_thread = _thread_cpu_s()
        by_thread.subtract(threads_before)
        stop.set()
        await probe
        stored = await _stored_states(runtime)
        rss_after = _rss_mb()
    offered = sum(outcomes.values())
    raised = outcomes.pop("raised", 0)
    return {"offered": offered, "offered_rate": offered / offered_for,
            "drained_s": drained, "outcomes": outcomes, "raised": raised,
            "stored": stored, **_latencies(answered),
            "lag_max_ms": max(lags, default=0) * 1000, "lag_p99_ms": _pct(lags, 0.99) * 1000,
            "cpu_ms_per_msg": cpu / max(1, offered) * 1000,
            "net_cpu_ms_per_msg": max(0.0, cpu - idle_cpu_per_s * drained)
            / max(1, offered) * 1000,
            "idle_cpu_ms_per_s": idle_cpu_per_s * 1000,
            "cpu_ms_per_msg_by_thread": {name: round(spent / max(1, offered) * 1000, 2)
                                         for name, spent in by_thread.items() if spent > 0},
            "rss_growth_mb": rss_after - rss_before}


def _latencies(answered: list[tuple[float, float, float]]) -> dict[str, float]:
    """p50/p99 in ms: to the reply sent, to everything recorded; over the whole run and over
    its steady state (messages offered after the first ``TRANSIENT_S``: admission control
    reacts to a flood within its first few tens of milliseconds)."""
    steady = [a for a in answered if a[0] >= TRANSIENT_S]
    slowest = sorted(answered, key=lambda a: a[1])[-max(1, len(answered) // 100):]
    stats = {"slowest_early": sum(1 for a in slowest if a[0] < TRANSIENT_S),
             "slowest": len(slowest) if answered else 0}
    for label, rows in (("", answered), ("steady_", steady)):
        for column, name in ((1, "sent"), (2, "lat")):
            values = [row[column] for row in rows]
            stats[f"{label}{name}_p50_ms"] = _pct(values, 0.5) * 1000
            stats[f"{label}{name}_p99_ms"] = _pct(values, 0.99) * 1000
    return stats


def _print(label: str, result: dict[str, Any]) -> None:
    print(f"\n## {label}")
    print(f"offered {result['offered']} msg at {result['offered_rate']:.0f} msg/s; all final "
          f"after {result['drained_s']:.1f} s; handle() raised: {result['raised']}")
    print(f"outcomes (returned): {dict(result['outcomes'])}")
    print(f"stored user messages by status: {dict(result['stored'])} "
          f"(total {sum(result['stored'].values())})")
    for prefix, span in (("", "whole run"), ("steady_", f"after the first {TRANSIENT_S:.0f} s")):
        print(f"answered ({span}): reply sent after p50 {result[prefix + 'sent_p50_ms']:.1f} "
              f"ms, p99 {result[prefix + 'sent_p99_ms']:.1f} ms; all recorded after p50 "
              f"{result[prefix + 'lat_p50_ms']:.1f} ms, p99 {result[prefix + 'lat_p99_ms']:.1f} ms")
    print(f"the slowest 1% to the reply sent: {result['slowest_early']} of "
          f"{result['slowest']} offered in the first {TRANSIENT_S:.0f} s")
    print(f"event loop lag p99 {result['lag_p99_ms']:.1f} ms, max {result['lag_max_ms']:.1f} ms")
    print(f"CPU {result['cpu_ms_per_msg']:.3f} ms/msg, {result['net_cpu_ms_per_msg']:.3f} ms/msg "
          f"net of the idle {result['idle_cpu_ms_per_s']:.1f} ms/s | RSS growth "
          f"{result['rss_growth_mb']:.0f} MB")
    print(f"CPU ms/msg by thread (gross): {result['cpu_ms_per_msg_by_thread']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=2000)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--viewers", type=int, default=2000)
    parser.add_argument("--switch-interval-ms", type=float, default=None,
                        help="sys.setswitchinterval for this run (default: Python's 5 ms)")
    parser.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                        help="a limits setting for the run, e.g. max_overhead_ms=3 "
                             "(repeatable; default: the checkout's defaults)")
    parser.add_argument("--store-url", default=None,
                        help="an empty database to use instead of a new SQLite file, e.g. "
                             "postgresql+asyncpg://user@host/bench")
    parser.add_argument("--known-viewers", type=int, default=0,
                        help="viewers already in the store before the run (a channel with "
                             "a past), none of them among the flood's")
    args = parser.parse_args()
    if args.switch_interval_ms is not None:
        sys.setswitchinterval(args.switch_interval_ms / 1000)
    limits = {name: float(value) for name, value in (item.split("=", 1) for item in args.limit)}
    result = asyncio.run(scenario(args.rate, args.seconds, args.viewers, args.store_url,
                                  limits, args.known_viewers))
    known = f", {args.known_viewers} more known" if args.known_viewers else ""
    _print(f"{args.rate:.0f} msg/s for {args.seconds:.0f} s from {args.viewers} viewers{known}",
           result)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {peak:.0f} MB")


if __name__ == "__main__":
    main()
