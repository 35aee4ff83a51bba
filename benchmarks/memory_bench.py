"""Does a viewer's earlier word reach the prompt when it matters? Per-viewer memory, measured
on the context the engine receives (no model needed).

    python -m benchmarks.memory_bench [--quick] [--viewers 200] [--sessions 30] [--seed 7]
                                      [--stored 100000]

Seeded, synthetic stream transcripts: viewers on Discord and Twitch, Traditional Chinese and
English, small talk with facts planted early (a pet's name, a job, an exam, a favourite game),
a job that changes halfway, and chatter that shares words with other viewers' facts. In the
last session each viewer asks for their facts in other words ("我家那隻叫什麼來著？"). Every
message goes through the runtime as ``vtuber-bot run`` opens it (SQLite, the bundled persona,
a scripted model that records what it was sent). Per configuration it prints:

- recall: the planted fact's value is in the prompt of the question that asks for it;
- latest: for the changed job, the new value is in the prompt;
- contamination: prompts that hold another viewer's fact (must be 0);
- memory tokens: what the retrieved memories and the history cost the prompt;
- retrieval p50/p95: one search, as the reply path runs it.

Configurations in the same run: the default (hybrid: lexical, plus dense where an embedder is
on), lexical only (no embedder), recent history only (no retrieval). ``--stored N``: the store
holds N memories of 1,000 other viewers first (their own pets, games, exams and jobs, and
chatter: the same words as the measured viewers'), so retrieval runs at that size.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.config import parse_config
from bot.events import ChatEvent
from bot.paths import DataPaths
from bot.runtime import Runtime, open_runtime
from engine.backends.scripted import ScriptedBackend

# kind: (statement zh, statement en, question zh, question en, values)
FACTS: dict[str, tuple[str, str, str, str, tuple[str, ...]]] = {
    "pet": ("跟你說，我家的貓叫{v}，超級黏人", "by the way my cat is called {v}, so clingy",
            "我家那隻叫什麼來著？", "what was my pet's name again?",
            ("麻糬", "布丁", "小黑", "豆花", "湯圓", "Mochi", "Pudding", "Biscuit", "Pepper")),
    "game": ("最近每天都在玩{v}，停不下來", "I play {v} every day lately, can't stop",
             "我最近迷上的那款遊戲是什麼？", "which game was I hooked on?",
             ("薩爾達", "星露谷", "原神", "魔物獵人", "Hades", "Celeste", "Terraria")),
    "exam": ("下禮拜要考{v}，好緊張", "I have my {v} exam next week, so nervous",
             "我之前擔心的那個考試是什麼？", "did I pass the thing I was worried about?",
             ("多益", "日檢", "微積分", "駕照", "TOEFL", "chemistry", "driving test")),
    "job": ("我現在在{v}上班，每天好累", "I work at {v} now, every day is tiring",
            "我現在是在哪裡工作？", "where do I work these days?",
            ("咖啡廳", "便利商店", "書店", "銀行", "a bakery", "a bookshop", "the post office")),
}
CHATTER_ZH = ("今天的直播好好笑，聊天室也好熱鬧", "剛下班回家，貓在門口等我吃飯",
              "遊戲打到一半就睡著了哈哈", "考試週大家都好忙，加油喔", "外面下好大的雨，記得帶傘",
              "晚餐吃了拉麵，湯頭很濃", "上班的路上看到彩虹", "週末想去書店逛逛")
CHATTER_EN = ("the stream is so fun today, chat is wild", "just got home from work, so tired",
              "fell asleep in the middle of a game lol", "exam season is rough for everyone",
              "it's raining hard outside, stay dry", "had ramen for dinner, so good")
NEW_JOB_AT = 0.5  # of the sessions: the job changes here


@dataclass
class Viewer:
    platform: str
    user: str
    english: bool
    facts: dict[str, str] = field(default_factory=dict)  # kind -> current value
    old_job: str | None = None


def _viewers(count: int, rng: random.Random) -> list[Viewer]:
    viewers = []
    for index in range(count):
        viewer = Viewer("discord" if index % 2 else "twitch", f"v{index}", index % 3 == 0)
        for kind, (*_texts, values) in FACTS.items():
            # A value no other viewer has (a fixed-width number: no value is a prefix of
            # another), so another viewer's fact in a prompt is visible.
            viewer.facts[kind] = f"{rng.choice(values)}-{index:04d}"
        viewers.append(viewer)
    return viewers


def _say(viewer: Viewer, kind: str) -> str:
    zh, en, *_rest = FACTS[kind]
    return (en if viewer.english else zh).format(v=viewer.facts[kind])


def _ask(viewer: Viewer, kind: str) -> str:
    _zh, _en, question_zh, question_en, _values = FACTS[kind]
    return question_en if viewer.english else question_zh


def _script(viewers: list[Viewer], sessions: int, chatter: int,
            rng: random.Random) -> list[tuple[Viewer, str]]:
    """Every message before the last session, in order: facts in the first two sessions, the
    new job halfway, chatter throughout."""
    lines: list[tuple[Viewer, str]] = []
    kinds = list(FACTS)
    for session in range(sessions - 1):
        for viewer in viewers:
            if session < 2:
                lines += [(viewer, _say(viewer, kind)) for kind in kinds[session::2]]
            if session == int(sessions * NEW_JOB_AT):
                viewer.old_job = viewer.facts["job"]
                viewer.facts["job"] = f"{rng.choice(FACTS['job'][4])}-{viewer.user[1:]:0>4}n"
                lines.append((viewer, _say(viewer, "job")))
            pool = CHATTER_EN if viewer.english else CHATTER_ZH
            lines += [(viewer, rng.choice(pool)) for _ in range(chatter)]
    return lines


def _config(db: Path, mode: str) -> Any:
    return parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": ["嗯嗯，我記得。"]}},
                   "embedding": {"enabled": mode == "hybrid"}},
        "store": {"url": f"sqlite+aiosqlite:///{db}", "rag_enabled": mode != "history only"},
        "limits": {"user_messages_per_minute": 100_000, "per_user_queue_of_one": False},
    }, env={})


class _Sink:
    async def send(self, text: str) -> str | None:
        return None

    async def edit(self, message_id: str, text: str) -> None:
        return None

    async def typing(self) -> None:
        return None


async def _tell(runtime: Runtime, viewer: Viewer, text: str, index: int) -> None:
    await runtime.service.handle(ChatEvent(
        platform=viewer.platform, channel_id="stream", platform_user_id=viewer.user,
        display_name=viewer.user, text=text, sink=_Sink(), message_id=f"m{index}"))


async def _run(mode: str, viewers: list[Viewer], lines: list[tuple[Viewer, str]],
               folder: Path, stored: int) -> dict[str, Any]:
    backend = ScriptedBackend(["嗯嗯，我記得。"])
    async with open_runtime(_config(folder / f"{mode}.db", mode), DataPaths.resolve(
            folder / mode), backend=backend) as runtime:
        if stored and runtime.retriever is not None:
            await _fill(runtime, stored, random.Random(stored))
        for index, (viewer, text) in enumerate(lines):
            await _tell(runtime, viewer, text, index)
        await runtime.service.settle()
        return await _questions(runtime, backend, viewers, len(lines))


async def _fill(runtime: Runtime, count: int, rng: random.Random, others: int = 1000,
                batch: int = 5000) -> None:
    """``count`` memories of ``others`` viewers not measured, written straight to the store
    (with random unit vectors where an embedder is on: only their number matters there)."""
    import numpy as np

    from memory.store import NewMemory

    persona_id = runtime.engine.persona.id
    users = [await runtime.store.resolve_user("twitch", f"other{i}", f"other{i}")
             for i in range(others)]
    embedder = runtime.engine.embedder
    if embedder is not None and not embedder.loaded:
        await asyncio.to_thread(embedder.load)
    dimension = embedder.dimension if embedder is not None else 0
    texts = [zh.format(v=f"{rng.choice(values)}-x{i}") for i, (zh, _en, _q, _qe, values)
             in enumerate(FACTS.values())] + list(CHATTER_ZH) + list(CHATTER_EN)
    for start in range(0, count, batch):
        size = min(batch, count - start)
        vectors = (np.random.default_rng(start).standard_normal((size, dimension))
                   .astype(np.float32) if dimension else None)
        if vectors is not None:
            vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        await runtime.store.add_memories([NewMemory(
            "user", persona_id, f"{rng.choice(texts)} #{start + i}", "filler",
            users[(start + i) % others], None,
            vectors[i].tobytes() if vectors is not None else None) for i in range(size)])
    print(f"stored {count} memories of {others} other viewers", flush=True)


async def _questions(runtime: Runtime, backend: ScriptedBackend, viewers: list[Viewer],
                     first_index: int) -> dict[str, Any]:
    found = latest = asked = contaminated = 0
    memory_tokens: list[int] = []
    searches: list[float] = []
    others = {v.user: set(v.facts.values()) | {v.old_job or ""} for v in viewers}
    index = first_index
    for viewer in viewers:
        for kind in FACTS:
            question = _ask(viewer, kind)
            await _tell(runtime, viewer, question, index)
            index += 1
            prompt = "\n".join(m.content for m in backend.requests[-1].messages[1:])
            asked += 1
            hit = viewer.facts[kind] in prompt
            found += hit
            latest += hit if kind == "job" else 0
            contaminated += any(value and value in prompt for user, values in others.items()
                                if user != viewer.user for value in values)
            memory_tokens.append(runtime.engine.count_tokens(prompt))
            searches.append(await _timed_search(runtime, viewer, question))
    ordered = sorted(searches)
    return {"recall_pct": round(100 * found / asked, 1),
            "latest_pct": round(100 * latest / len(viewers), 1),
            "contaminated": contaminated,
            "context_tokens_p50": int(statistics.median(memory_tokens)),
            "search_p50_ms": round(ordered[len(ordered) // 2] * 1000, 2),
            "search_p95_ms": round(ordered[int(len(ordered) * 0.95)] * 1000, 2)}


async def _timed_search(runtime: Runtime, viewer: Viewer, question: str) -> float:
    if runtime.retriever is None:
        return 0.0
    user_id = await runtime.store.find_user(viewer.platform, viewer.user)
    started = time.perf_counter()
    await runtime.retriever.search(question, user_id=user_id)
    return time.perf_counter() - started


async def main(args: argparse.Namespace) -> list[dict[str, Any]]:
    rng = random.Random(args.seed)
    viewers = _viewers(args.viewers, rng)
    lines = _script(viewers, args.sessions, args.chatter, rng)
    print(f"{len(viewers)} viewers, {args.sessions} sessions, {len(lines)} messages, "
          f"{args.stored} other memories stored first; "
          f"facts stated {args.sessions - 2} or more sessions before they are asked for",
          flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="memory-bench-") as folder:
        for mode in args.modes.split(","):
            started = time.perf_counter()
            row = {"configuration": mode,
                   **await _run(mode, viewers, lines, Path(folder), args.stored),
                   "run_s": round(time.perf_counter() - started, 1)}
            print(row, flush=True)
            rows.append(row)
    columns = list(rows[0])
    print("\n| " + " | ".join(columns) + " |\n|" + " --- |" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(row[c]) for c in columns) + " |")
    return rows


def _arguments(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small run for the CPU (a test)")
    parser.add_argument("--viewers", type=int, default=None, help="200; --quick: 12")
    parser.add_argument("--sessions", type=int, default=None, help="30; --quick: 12")
    parser.add_argument("--chatter", type=int, default=None,
                        help="chatter lines per viewer and session: 3; --quick: 2")
    parser.add_argument("--modes", default="hybrid,lexical only,history only")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--stored", type=int, default=0,
                        help="other viewers' memories in the store first (retrieval at size)")
    args = parser.parse_args(argv)
    args.viewers = args.viewers or (12 if args.quick else 200)
    args.sessions = args.sessions or 12 if args.quick else args.sessions or 30
    args.chatter = args.chatter or (2 if args.quick else 3)
    return args


if __name__ == "__main__":
    asyncio.run(main(_arguments()))
