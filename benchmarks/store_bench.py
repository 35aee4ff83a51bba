"""Store benchmark on this machine (SQLite file): writes, history load, hybrid retrieval.

    python -m benchmarks.store_bench [--memories 100000] [--messages 10000]

Each of ours is printed next to the naive way of doing the same job, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from memory.rag import MemoryRetriever, to_blob
from memory.store import NewMemory, Store, sqlite_url
from memory.store.conversations import Conversations

# A Zipf-like corpus: a few thousand words and characters, frequent ones much more likely,
# so lexical match sets look like chat text rather than a 20-word toy vocabulary.
_VOCAB_RNG = random.Random(7)
WORDS = ["".join(_VOCAB_RNG.choice("abcdefghijklmnoprstuvwy") for _ in range(
    _VOCAB_RNG.randint(3, 9))) for _ in range(5000)]
CJK = [chr(0x4E00 + i) for i in range(3000)]
ZIPF = [1 / (rank + 1) for rank in range(5000)]
ZIPF_CJK = ZIPF[:3000]
DIM = 384


def sentence(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return " ".join(rng.choices(WORDS, ZIPF, k=12))
    return "".join(rng.choices(CJK, ZIPF_CJK, k=24))


class RandomEmbedder:
    """Stands in for MiniLM (its ~10 ms per query on CPU is reported separately)."""

    def __init__(self) -> None:
        self._rng = np.random.default_rng(0)

    def encode(self, texts: list[str]) -> np.ndarray:
        vectors = self._rng.standard_normal((len(texts), DIM)).astype(np.float32)
        return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def pct(samples: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))]
    return f"p50 {statistics.median(ordered) * 1000:.2f} ms, p95 {p95 * 1000:.2f} ms"


async def bench_writes(store: Store, user: int, count: int) -> list[tuple[str, str]]:
    now = datetime.now(UTC)
    item = {"user_id": user, "persona_id": "pell", "platform": "twitch", "channel_id": "c",
            "platform_message_id": None, "content": "hello there", "created_at": now}
    started = time.perf_counter()
    for _ in range(count // 10):
        await Conversations(store.database).record_incoming(
            user_id=user, persona_id="pell", platform="twitch", channel_id="c",
            platform_message_id=None, text="hello there", created_at=now)
    naive = (count // 10) / (time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(count // 100):
        await Conversations(store.database).record_incoming_many([dict(item) for _ in range(100)])
    batched = (count // 100 * 100) / (time.perf_counter() - started)
    return [("writes, one transaction per message (naive)", f"{naive:,.0f} msg/s"),
            ("writes, batches of 100 (record_incoming_many)", f"{batched:,.0f} msg/s")]


async def bench_history(store: Store, user: int, runs: int = 200) -> list[tuple[str, str]]:
    naive, ours = [], []
    for _ in range(20):
        started = time.perf_counter()
        rows = await Conversations(store.database).messages_for(user)
        _ = rows[-12:]
        naive.append(time.perf_counter() - started)
    for _ in range(runs):
        started = time.perf_counter()
        await Conversations(store.database).recent_history(user, "pell", 12)
        ours.append(time.perf_counter() - started)
    return [("history: load all rows, keep last 12 (naive)", pct(naive)),
            ("history: recent_history(limit=12), indexed", pct(ours))]


async def bench_retrieval(store: Store, users: list[int], count: int,
                          runs: int = 100) -> list[tuple[str, str]]:
    rng = random.Random(1)
    embedder = RandomEmbedder()
    batch = 5000
    started = time.perf_counter()
    for offset in range(0, count, batch):
        texts = [sentence(rng) for _ in range(min(batch, count - offset))]
        vectors = embedder.encode(texts)
        await store.add_memories([
            NewMemory("user" if i % 2 else "persona", "pell", t, f"bench:{offset + i}",
                      rng.choice(users) if i % 2 else None, None, to_blob(v))
            for i, (t, v) in enumerate(zip(texts, vectors, strict=True))
        ])
    load = time.perf_counter() - started
    retriever = MemoryRetriever(store, "pell", embedder, k=4)
    await retriever.search("warm-up")
    queries = [sentence(rng)[:12] for _ in range(runs)]
    ours = []
    for query in queries:
        started = time.perf_counter()
        await retriever.search(query, user_id=users[0])
        ours.append(time.perf_counter() - started)
    naive = []
    for query in queries[:10]:  # brute force straight from the database, every query
        started = time.perf_counter()
        rows = await store.memory_vectors("pell", 0, batch=count + 1)
        matrix = np.stack([np.frombuffer(blob, dtype=np.float32) for _, _, blob in rows])
        scores = matrix @ embedder.encode([query])[0]
        _ = np.argsort(-scores)[:4]
        naive.append(time.perf_counter() - started)
    return [(f"insert {count:,} memories (with FTS5 index)", f"{count / load:,.0f} rows/s"),
            (f"hybrid search over {count:,}: vectors re-read from DB per query (naive)",
             pct(naive)),
            (f"hybrid search over {count:,}: in-memory index + FTS5, RRF (ours)", pct(ours))]


def bench_embedder() -> list[tuple[str, str]]:
    from engine.config import EmbeddingConfig
    from engine.embedder import Embedder

    embedder = Embedder(EmbeddingConfig())
    embedder.encode(["warm-up"])
    samples = []
    for i in range(30):
        started = time.perf_counter()
        embedder.encode([f"what does she like to eat {i}"])
        samples.append(time.perf_counter() - started)
    return [("MiniLM query embedding on CPU (added to each search)", pct(samples))]


async def main_async(args: argparse.Namespace) -> list[tuple[str, str]]:
    folder = Path(tempfile.mkdtemp(prefix="store-bench-"))
    store = await Store.open(sqlite_url(folder / "bench.db"))
    try:
        users = [await store.resolve_user("twitch", f"u{i}", f"u{i}") for i in range(50)]
        rows = await bench_writes(store, users[0], args.messages)
        rows += await bench_history(store, users[0])
        rows += await bench_retrieval(store, users, args.memories)
    finally:
        await store.close()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--memories", type=int, default=100_000)
    parser.add_argument("--messages", type=int, default=10_000)
    args = parser.parse_args()
    rows: list[tuple[str, Any]] = asyncio.run(main_async(args))
    rows += bench_embedder()
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
