"""What a viewer meets: the whole runtime against the backend alone, one model, one process.

    python -m benchmarks.service_bench [--model-dir .bench/qwen3-8b-realvocab] [--tiny]
                                       [--viewers 300] [--history 4] [--prefix-cache-gb auto]

The runtime as ``vtuber-bot run`` opens it (``open_runtime``, ``ConversationService.handle``):
the bundled persona, SQLite in a temporary folder, lexical RAG and long-term memories,
OpenCC, streaming previews, ``max_batch_size`` 32, 60-token replies (``--new-tokens``), the
in-process engine with continuous batching. Viewers come back: each first says ``--history``
things (so their history and memories are in their prompts), then the loads pick viewers at
random from those not waiting for a reply.
Loads: one viewer at a time, Poisson 4, 12 and 24 msg/s, a burst of 32; each followed by the
same load against the backend alone (``arrivals_bench``'s requests: the persona's system turn and
50-250 tokens of a viewer's own) on the same backend object, for the ratio.

Printed per load and side: offered, answered, dropped by reason, offered → reply sent
p50/p95/max, offered → first preview p50, prompt tokens computed and from the prefix cache,
the decode loop's time decoding and prefilling (steps, ms a step, rows a step), event-loop
lag p99, and the GPU allocator's retries (a pause each: memory ran short). ``--tiny``: the
tiny test model on the CPU, a few viewers, short loads (a test runs it).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.arrivals_bench import _load, _worker_timings, prepare
from benchmarks.loop_stalls import LoopStalls
from benchmarks.pipeline_bench import _pct
from bot.cli import RUNTIME_SWITCH_INTERVAL_S
from bot.config import parse_config
from bot.events import ChatEvent
from bot.paths import DataPaths
from bot.runtime import open_runtime

LOADS = (("one viewer at a time", -1.0, 8.0), ("poisson 4 msg/s", 4.0, 12.0),
         ("poisson 12 msg/s", 12.0, 10.0), ("poisson 24 msg/s", 24.0, 8.0),
         ("burst of 32", 0.0, 32.0))
TINY_LOADS = (("one viewer at a time", -1.0, 3.0), ("poisson 4 msg/s", 4.0, 2.0),
              ("burst of 8", 0.0, 8.0))
LINES = ("佩兒今天的星星好亮喔，你在燈塔上看得到嗎？", "我今天考試考完了，好累但是很開心",
         "我家的貓又把書架上的書推下來了", "你最喜歡哪個星座？我是天蠍座",
         "剛下班，今天老闆又叫我加班", "The sky is so clear tonight, can you see Orion?",
         "我明天要去爬山，有什麼要帶的嗎", "最近在玩一款新的遊戲，好難但好好玩",
         "Do you ever get lonely up in the lighthouse?", "晚餐吃了拉麵，你喜歡吃什麼？")


class TimingSink:
    """Records when the first preview and the last text (the reply) went out. It edits, as
    Discord does, so replies stream as previews."""

    supports_edits = True

    def __init__(self) -> None:
        self.first: float | None = None
        self.last: float | None = None

    def _mark(self) -> None:
        self.last = time.perf_counter()
        self.first = self.first or self.last

    async def send(self, text: str) -> str:
        self._mark()
        return "m"

    async def edit(self, message_id: str, text: str) -> None:
        self._mark()

    async def typing(self) -> None:
        return None


class LagMeter:
    """Event-loop lag: how late a 10 ms sleep wakes up, sampled while a load runs; and where
    the loop was while it was late (``LoopStalls``)."""

    def __init__(self) -> None:
        self.samples: list[float] = []
        self.stalls = LoopStalls()
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            started = time.perf_counter()
            await asyncio.sleep(0.01)
            self.stalls.beat()
            self.samples.append(time.perf_counter() - started - 0.01)

    def __enter__(self) -> LagMeter:
        self._task = asyncio.get_running_loop().create_task(self._run())
        self.stalls.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stalls.stop()
        if self._task is not None:
            self._task.cancel()


def _config(model_dir: Path, device: str, prefix_cache_gb: str, new_tokens: int,
            engine_process: str) -> Any:
    return parse_config({
        "models": {"llm": {"model_path": str(model_dir), "device": device,
                           "max_batch_size": 32, "continuous_batching": "on",
                           "max_length": 2048, "prefix_cache_gb": prefix_cache_gb,
                           "engine_process": engine_process},
                   "embedding": {"enabled": False}},
        "vtuber": {"response": {"max_tokens": new_tokens, "min_tokens": new_tokens}},
        "store": {"remember_messages_min_chars": 12, "rag_enabled": True},
        "limits": {"user_messages_per_minute": 100_000, "reply_timeout_s": 120},
    }, env={})


def _event(viewer: int, index: int, rng: random.Random, sink: TimingSink) -> ChatEvent:
    return ChatEvent(platform="twitch", channel_id="stream", platform_user_id=f"v{viewer}",
                     display_name=f"viewer {viewer}", text=f"佩兒 {rng.choice(LINES)} #{index}",
                     sink=sink, message_id=f"m{index}")


class Offered:
    """One load through the service: outcomes and timings."""

    def __init__(self) -> None:
        self.outcomes: Counter[str] = Counter()
        self.replies: list[float] = []
        self.previews: list[float] = []
        self.waiting: set[int] = set()  # viewers whose message is not answered yet

    def next_viewer(self, rng: random.Random, viewers: int) -> int:
        """A viewer at random among those not waiting for a reply: chat viewers mostly wait
        for the answer before they speak again, and the runtime answers one viewer's messages
        in order, which the backend alone (no viewers) would not have to."""
        free = [v for v in range(viewers) if v not in self.waiting]
        return rng.choice(free) if free else rng.randrange(viewers)

    async def one(self, runtime: Any, event: ChatEvent, sink: TimingSink) -> None:
        started = time.perf_counter()
        viewer = int(event.platform_user_id[1:])
        self.waiting.add(viewer)
        try:
            reply = await runtime.service.handle(event)
        finally:
            self.waiting.discard(viewer)
        self.outcomes[f"{reply.status}:{reply.reason}" if reply.reason else reply.status] += 1
        if reply.status == "answered" and sink.last is not None and sink.first is not None:
            self.replies.append(sink.last - started)
            self.previews.append(sink.first - started)


async def _service_load(runtime: Any, label: str, rate: float, amount: float, cap: float,
                        viewers: int, first_index: int) -> dict[str, Any]:
    rng = random.Random(first_index)
    count = int(amount) if rate <= 0 else int(rate * amount)
    offered = Offered()
    tasks: list[asyncio.Task[None]] = []
    for index in range(first_index, first_index + count):
        if rate > 0:
            await asyncio.sleep(rng.expovariate(rate))
        viewer = 0 if rate < 0 else offered.next_viewer(rng, viewers)
        sink = TimingSink()
        tasks.append(asyncio.create_task(
            offered.one(runtime, _event(viewer, index, rng, sink), sink)))
        if rate < 0:
            await asyncio.wait(tasks[-1:], timeout=cap)
    _done, late = await asyncio.wait(tasks, timeout=cap) if tasks else (set(), set())
    for task in late:
        task.cancel()
    await asyncio.gather(*late, return_exceptions=True)
    dropped = {k: v for k, v in offered.outcomes.items() if k != "answered"}
    return {"load": label, "side": "runtime", "offered": count,
            "answered": offered.outcomes["answered"],
            "dropped": ", ".join(f"{k} {v}" for k, v in sorted(dropped.items())) or "0",
            "p50_s": _round(_pct(offered.replies, 0.5)),
            "p95_s": _round(_pct(offered.replies, 0.95)),
            "max_s": _round(max(offered.replies, default=float("nan"))),
            "preview_p50_s": _round(_pct(offered.previews, 0.5))}


def _round(value: float) -> float:
    return round(value, 3)


def _engine_split(spent: Counter[str]) -> dict[str, Any]:
    """The decode loop in a load's window: time decoding and prefilling, prompt tokens."""
    computed = spent["prompt_tokens"] - spent["cached_tokens"]
    steps = spent["steps"]
    return {"decode_s": round(spent["step_s"], 1), "steps": int(steps),
            "step_ms": round(spent["step_s"] / steps * 1000, 1) if steps else 0.0,
            "forward_ms": round(spent["forward_s"] / steps * 1000, 1) if steps else 0.0,
            "graph_steps": int(spent["graph_steps"]),
            "rows_per_step": round(spent["rows_stepped"] / steps, 1) if steps else 0.0,
            "prefill_s": round(spent["admit_s"], 1),
            # of which: the prompts' chat template and ids, and the joins to their first tokens
            "tokenize_s": round(spent["tokenize_s"], 2), "join_s": round(spent["join_s"], 2),
            "chunk_s": round(spent["chunk_s"], 1),
            "prefills": int(spent["prefills"]), "chunks": int(spent["chunks"]),
            "prompt_tok_computed": int(computed), "prompt_tok_cached": int(spent["cached_tokens"])}


async def _measured(backend: Any, run: Any) -> dict[str, Any]:
    before, retries = await _engine_totals(backend)
    with LagMeter() as lag:
        row = await run
    if lag.stalls.samples:
        print(lag.stalls.table(), flush=True)
    after, retries_after = await _engine_totals(backend)
    return {**row, **_engine_split(after - before),
            "loop_lag_p99_ms": round(_pct(lag.samples, 0.99) * 1000, 1),
            "alloc_retries": retries_after - retries}


async def _engine_totals(backend: Any) -> tuple[Counter[str], int]:
    """The decode loop's totals and how often the GPU's caching allocator had to free its
    cache and retry (each time a synchronising pause: memory, the prefix cache's share say,
    ran short), from this process or from the engine process."""
    if hasattr(backend, "fresh_health"):
        report = await backend.fresh_health()
        return Counter(report.get("timings", {})), int(report.get("alloc_retries", 0))
    import torch

    retries = (torch.cuda.memory_stats().get("num_alloc_retries", 0)
               if torch.cuda.is_available() else 0)
    return _worker_timings(backend), int(retries)


async def _warm_viewers(runtime: Any, viewers: int, history: int) -> None:
    """Each viewer says ``history`` things first, 32 viewers at a time."""
    rng = random.Random(1)
    for turn in range(history):
        for start in range(0, viewers, 32):
            await asyncio.gather(*(
                runtime.service.handle(_event(v, 10_000_000 + turn * viewers + v, rng,
                                              TimingSink()))
                for v in range(start, min(viewers, start + 32))))


async def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    loads = TINY_LOADS if args.tiny else LOADS
    if args.loads:
        loads = tuple(sorted((load for load in loads if _short(load[0]) in args.loads),
                             key=lambda load: args.loads.index(_short(load[0]))))
    folder = Path(tempfile.mkdtemp(prefix="vtuber-service-bench-"))
    config = _config(args.model_dir, "cpu" if args.tiny else args.device, args.prefix_cache_gb,
                     args.new_tokens, args.engine_process)
    rows: list[dict[str, Any]] = []
    async with open_runtime(config, DataPaths.resolve(folder)) as runtime:
        backend = runtime.engine.backend
        print(f"engine: {type(backend).__name__}", flush=True)
        print(f"warming {args.viewers} viewers with {args.history} messages each", flush=True)
        await _warm_viewers(runtime, args.viewers, args.history)
        system = runtime.engine.persona.system_prompt("zh")
        for number, (label, rate, amount) in enumerate(loads, start=1):
            rows.append(await _measured(backend, _service_load(
                runtime, label, rate, amount, args.cap, args.viewers, number * 100_000)))
            print(rows[-1], flush=True)  # as it comes: a run cut short keeps what it had
            # Prompts of their own in each load: none starts with an earlier one.
            row = await _measured(backend, _load(backend, label, rate, amount, args.cap,
                                                 system, seed=number, new_tokens=args.new_tokens))
            rows.append(_backend_row(row))
            print(rows[-1], flush=True)
    return rows


def _short(label: str) -> str:
    """A load's name on the command line: one, p4, p12, p24, burst."""
    if label.startswith("poisson"):
        return "p" + label.split()[1]
    return label.split()[0]


def _backend_row(row: dict[str, Any]) -> dict[str, Any]:
    """``arrivals_bench``'s row in this table's columns."""
    return {"load": row["load"], "side": "backend alone", "offered": row["requests"],
            "answered": row["requests"] - row["over_cap"],
            "dropped": f"over cap {row['over_cap']}" if row["over_cap"] else "0",
            "p50_s": row["reply_p50"], "p95_s": row["reply_p95"], "max_s": row["reply_max"],
            "preview_p50_s": row["ttft_p50"],
            **{k: row[k] for k in ("decode_s", "steps", "step_ms", "forward_ms",
                                   "graph_steps", "rows_per_step",
                                   "prefill_s", "chunk_s", "prefills", "chunks",
                                   "prompt_tok_computed",
                                   "prompt_tok_cached", "loop_lag_p99_ms", "alloc_retries")}}


def table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0]) if rows else []
    lines = ["| " + " | ".join(keys) + " |", "|" + " --- |" * len(keys)]
    lines += ["| " + " | ".join(str(row.get(k, "")) for k in keys) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", type=Path, default=Path(".bench/qwen3-8b-realvocab"))
    parser.add_argument("--tiny", action="store_true",
                        help="the tiny test model on the CPU, a few viewers, short loads")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--viewers", type=int, default=None, help="300; --tiny: 8")
    parser.add_argument("--history", type=int, default=None,
                        help="messages each viewer says first: 4; --tiny: 2")
    parser.add_argument("--prefix-cache-gb", default="auto",
                        help="models.llm.prefix_cache_gb: auto, GiB, or 0 (off: the baseline)")
    parser.add_argument("--new-tokens", type=int, default=None,
                        help="reply length, fixed: 60; --tiny: 12")
    parser.add_argument("--loads", type=lambda text: text.split(","), default=None,
                        help="which loads, in this order: one,p4,p12,p24,burst (default all)")
    parser.add_argument("--engine-process", choices=("auto", "on", "off"), default="auto",
                        help="models.llm.engine_process (auto: on a GPU)")
    parser.add_argument("--cap", type=float, default=60.0,
                        help="seconds after a load's last arrival before the rest is cut")
    args = parser.parse_args(argv)
    if args.tiny and args.model_dir == parser.get_default("model_dir"):
        args.model_dir = Path(".bench/tiny-qwen3")
    args.viewers = args.viewers or (8 if args.tiny else 300)
    args.history = args.history if args.history is not None else (2 if args.tiny else 4)
    args.new_tokens = args.new_tokens or (12 if args.tiny else 60)
    prepare(args.model_dir, tiny=args.tiny)
    # Warnings, and the engine's start-up lines (graphs captured, prefix cache size).
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("engine.backends").setLevel(logging.INFO)
    # As `vtuber-bot run` sets it: the decode loop's thread gets the GIL back sooner.
    sys.setswitchinterval(RUNTIME_SWITCH_INTERVAL_S)
    print(table(asyncio.run(run(args))))


if __name__ == "__main__":
    main()
