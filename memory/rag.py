"""Retrieval: persona knowledge files and long-term user memories, hybrid search.

Dense cosine (an in-process float32 matrix, refreshed incrementally from the store) and lexical
match (SQLite FTS5 trigram / PostgreSQL pg_trgm) are fused by reciprocal rank. The default
embedder is English-only, so Chinese relies on the lexical side. Scope is per user: a search
sees the persona's knowledge plus only the asking user's memories.

Embeddings come through the small ``Embedder`` protocol (``bot`` injects the engine's), and are
computed off the event loop.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from memory.store import NewMemory, Store, StoredMemory

log = logging.getLogger(__name__)

RRF_K = 60
WINDOW_CHARS = 400
WINDOW_OVERLAP = 80
_HEADING = re.compile(r"^(#{1,6})\s+(.*)$", re.M)
_CJK_RUN = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'-]{2,}")
_STOPWORDS = frozenset({"the", "and", "for", "are", "was", "with", "what", "who", "how",
                        "does", "did", "you", "your", "this", "that", "have", "has", "from",
                        "about"})


class Embedder(Protocol):
    """Texts → L2-normalised float32 vectors, shape (len(texts), dim). Blocking. ``query``
    marks a search query (retrieval models embed those with an instruction)."""

    def encode(self, texts: list[str], *, query: bool = False) -> np.ndarray: ...


@dataclass(frozen=True, slots=True)
class RetrievedChunk:
    id: int
    text: str
    source: str
    scope: str
    score: float
    dense_rank: int | None
    lexical_rank: int | None

    def trace(self) -> dict[str, object]:
        return {"id": self.id, "score": round(self.score, 5), "source": self.source,
                "dense_rank": self.dense_rank, "lexical_rank": self.lexical_rank}


@dataclass(frozen=True, slots=True)
class IndexReport:
    added_chunks: int
    unchanged_files: int
    removed_files: int


def lexical_terms(query: str, limit: int = 32) -> list[str]:
    """CJK runs as overlapping trigrams (bigram for a 2-character run), words of 3+ letters."""
    terms: list[str] = []
    for run in _CJK_RUN.findall(query):
        if len(run) < 3:
            terms.append(run)
        else:
            terms.extend(run[i:i + 3] for i in range(len(run) - 2))
    terms.extend(w.casefold() for w in _WORD.findall(query) if w.casefold() not in _STOPWORDS)
    return list(dict.fromkeys(terms))[:limit]


def cjk_bigrams(query: str, limit: int = 24) -> list[str]:
    """The query's CJK runs as overlapping bigrams: a viewer asking in other words ("我家那隻
    叫什麼？") shares two-character words with what they said ("我家的貓叫…"), rarely three."""
    grams = [run[i:i + 2] for run in _CJK_RUN.findall(query) for i in range(len(run) - 1)]
    return list(dict.fromkeys(grams))[:limit]


def split_markdown(text: str) -> list[str]:
    """Sections by heading (the heading kept as context), then overlapping windows."""
    sections: list[str] = []
    starts = [m.start() for m in _HEADING.finditer(text)] or [0]
    if starts[0] != 0:
        starts.insert(0, 0)
    for begin, end in zip(starts, [*starts[1:], len(text)], strict=True):
        section = text[begin:end].strip()
        if not section:
            continue
        heading = section.splitlines()[0] if section.startswith("#") else ""
        if len(section) <= WINDOW_CHARS:
            sections.append(section)
            continue
        step = WINDOW_CHARS - WINDOW_OVERLAP
        for offset in range(0, len(section), step):
            window = section[offset:offset + WINDOW_CHARS].strip()
            if offset and heading:
                window = f"{heading}\n{window}"
            if window:
                sections.append(window)
            if offset + WINDOW_CHARS >= len(section):
                break
    return sections


def to_blob(vector: np.ndarray) -> bytes:
    return np.asarray(vector, dtype=np.float32).tobytes()


PERSONA_OWNER = -1  # the owner of the persona's knowledge in the index


class _Rows:
    """One owner's vectors and memory ids."""

    def __init__(self, dimension: int) -> None:
        self.ids = np.zeros(0, dtype=np.int64)
        self.matrix = np.zeros((0, dimension), dtype=np.float32)

    def append(self, ids: list[int], vectors: np.ndarray) -> None:
        self.ids = np.concatenate([self.ids, np.asarray(ids, dtype=np.int64)])
        self.matrix = np.vstack([self.matrix, vectors])


class VectorIndex:
    """The embeddings of one persona's memories, kept per owner (the persona's knowledge,
    each viewer's own): a search scores only what its viewer may see, and a new memory is
    appended to its owner's rows alone. One matrix for everyone would score every viewer's
    memories in each search and copy all of them for each new memory (150 MB a message at
    100,000 memories)."""

    def __init__(self) -> None:
        self._owners: dict[int, _Rows] = {}
        self.last_id = 0

    def __len__(self) -> int:
        return sum(len(rows.ids) for rows in self._owners.values())

    def add(self, rows: list[tuple[int, int | None, bytes]]) -> None:
        grouped: dict[int, list[tuple[int, bytes]]] = {}
        for memory_id, user_id, blob in rows:
            owner = PERSONA_OWNER if user_id is None else user_id
            grouped.setdefault(owner, []).append((memory_id, blob))
        for owner, items in grouped.items():
            vectors = np.stack([np.frombuffer(blob, dtype=np.float32) for _, blob in items])
            if owner not in self._owners:
                self._owners[owner] = _Rows(vectors.shape[1])
            self._owners[owner].append([memory_id for memory_id, _ in items], vectors)
        if rows:
            self.last_id = max(self.last_id, max(memory_id for memory_id, _, _ in rows))

    def keep_only(self, live: set[int]) -> None:
        wanted = np.fromiter(live, dtype=np.int64, count=len(live))
        for owner, rows in list(self._owners.items()):
            mask = np.isin(rows.ids, wanted)
            rows.ids, rows.matrix = rows.ids[mask], rows.matrix[mask]
            if not len(rows.ids):
                del self._owners[owner]

    def search(self, query: np.ndarray, user_id: int | None, limit: int,
               min_similarity: float = -1.0) -> list[int]:
        """Ids of the ``limit`` nearest visible rows (the persona's knowledge, the viewer's
        own memories) with cosine similarity of at least ``min_similarity`` (vectors are
        L2-normalised), nearest first."""
        visible = [self._owners[owner] for owner in (PERSONA_OWNER, user_id)
                   if owner is not None and owner in self._owners]
        if not visible:
            return []
        query = query.astype(np.float32)
        scores = np.concatenate([rows.matrix @ query for rows in visible])
        ids = np.concatenate([rows.ids for rows in visible])
        keep = scores >= min_similarity
        scores, ids = scores[keep], ids[keep]
        count = min(limit, len(ids))
        if count == 0:
            return []
        top = np.argpartition(-scores, count - 1)[:count]
        top = top[np.argsort(-scores[top])]
        return [int(ids[i]) for i in top]


def _read_markdown(folder: Path) -> list[tuple[str, str]]:
    return [(f"knowledge:{path.relative_to(folder).as_posix()}", path.read_text("utf-8"))
            for path in sorted(folder.rglob("*.md"))]


class MemoryRetriever:
    """Implements the engine's retrieval protocol (``search(query)``), per persona."""

    def __init__(self, store: Store, persona_id: str, embedder: Embedder | None = None,
                 k: int = 4, candidates: int = 20, min_similarity: float = 0.3) -> None:
        self._store = store
        self._persona_id = persona_id
        self._embedder = embedder
        self._k = k
        # Below this cosine similarity a chunk is unrelated: without a floor, the nearest
        # chunks join every prompt, however far they are. (A lexical match needs no floor:
        # it shares words with the message.)
        self._min_similarity = min_similarity
        self._candidates = candidates
        self._index = VectorIndex()
        self._lock = asyncio.Lock()
        self._stale = False

    async def _embed(self, texts: list[str]) -> list[bytes | None]:
        if self._embedder is None or not texts:
            return [None] * len(texts)
        vectors = await asyncio.to_thread(self._embedder.encode, texts)
        return [to_blob(v) for v in vectors]

    async def index_knowledge(self, folder: Path) -> IndexReport:
        """(Re)index ``*.md`` under ``folder``; files whose hash is unchanged are skipped."""
        known = await self._store.source_hashes(self._persona_id)
        seen: set[str] = set()
        added = unchanged = 0
        for source, text in await asyncio.to_thread(_read_markdown, folder):
            digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
            seen.add(source)
            if known.get(source) == digest:
                unchanged += 1
                continue
            await self._store.delete_sources(self._persona_id, [source])
            chunks = split_markdown(text)
            blobs = await self._embed(chunks)
            await self._store.add_memories([
                NewMemory("persona", self._persona_id, chunk, source, None, digest, blob)
                for chunk, blob in zip(chunks, blobs, strict=True)
            ])
            added += len(chunks)
        stale = [s for s in known if s.startswith("knowledge:") and s not in seen]
        await self._store.delete_sources(self._persona_id, stale)
        if stale or added:
            await self._resync()
        log.info("knowledge index: %d chunks added, %d files unchanged, %d removed", added,
                 unchanged, len(stale))
        return IndexReport(added, unchanged, len(stale))

    async def remember(self, user_id: int, text: str, source: str) -> int:
        """Keep a long-term memory for one user (e.g. something they told the persona)."""
        [blob] = await self._embed([text])
        [memory_id] = await self._store.add_memories(
            [NewMemory("user", self._persona_id, text, source, user_id, None, blob)]
        )
        return memory_id

    async def remember_message(self, user_id: int, message_id: int, text: str) -> int | None:
        """Keep a viewer's message ``message_id`` as a memory, for whoever holds it when it
        is stored; None when it is gone by then (``Store.add_message_memory``)."""
        [blob] = await self._embed([text])
        return await self._store.add_message_memory(
            NewMemory("user", self._persona_id, text, f"message:{message_id}", user_id, None,
                      blob), message_id)

    async def _resync(self) -> None:
        async with self._lock:
            live = await self._store.memory_ids(self._persona_id)
            self._index.keep_only(live)

    def invalidate(self) -> None:
        """Memories were deleted, purged or moved to another user: rebuild the dense index
        from the store before the next search (ids may even be reused by SQLite)."""
        self._stale = True

    async def _refresh(self) -> None:
        async with self._lock:
            if self._stale:
                self._index, self._stale = VectorIndex(), False
            while rows := await self._store.memory_vectors(self._persona_id,
                                                           self._index.last_id):
                self._index.add(rows)

    async def search(self, query: str, user_id: int | None = None,
                     k: int | None = None) -> list[RetrievedChunk]:
        k = k or self._k
        # The query's embedding (the model, on a thread) and the store's two searches (on
        # its threads) at the same time: the reply waits for the slowest, not for their sum.
        dense_ids, lexical_ids, own_ids = await asyncio.gather(
            self._dense_search(query, user_id),
            self._store.lexical_search(lexical_terms(query), self._persona_id, user_id,
                                       self._candidates),
            self._own_search(query, user_id))
        fused: dict[int, float] = {}
        for ranking in (dense_ids, lexical_ids, own_ids):
            for rank, memory_id in enumerate(ranking):
                fused[memory_id] = fused.get(memory_id, 0.0) + 1.0 / (RRF_K + rank + 1)
        ranked = sorted(fused, key=lambda i: fused[i], reverse=True)
        rows = await self._store.get_memories(ranked)
        # Who may see a memory is decided from the stored row, never from the cached index.
        visible = _distinct([i for i in ranked if i in rows and _visible(rows[i], user_id)],
                            rows)[:k]
        return [
            RetrievedChunk(
                id=i, text=rows[i].text, source=rows[i].source, scope=rows[i].scope,
                score=fused[i],
                dense_rank=dense_ids.index(i) if i in dense_ids else None,
                lexical_rank=lexical_ids.index(i) if i in lexical_ids else None,
            )
            for i in visible
        ]


    async def _dense_search(self, query: str, user_id: int | None) -> list[int]:
        if self._embedder is None:
            return []
        await self._refresh()
        [vector] = await asyncio.to_thread(
            functools.partial(self._embedder.encode, [query], query=True))
        return self._index.search(vector, user_id, self._candidates, self._min_similarity)

    async def _own_search(self, query: str, user_id: int | None) -> list[int]:
        """The viewer's own memories by the words they share with the query, loosely: the
        few memories of one viewer can afford it, the whole index cannot."""
        if user_id is None:
            return []
        return await self._store.viewer_memory_search(
            cjk_bigrams(query), self._persona_id, user_id, self._candidates)


def _distinct(ranked: list[int], rows: dict[int, StoredMemory]) -> list[int]:
    """``ranked`` without repeats of a text already kept: a viewer who says the same thing
    often must not fill every place in the prompt with it."""
    seen: set[str] = set()
    kept = []
    for memory_id in ranked:
        text = " ".join(rows[memory_id].text.split()).casefold()
        if text not in seen:
            seen.add(text)
            kept.append(memory_id)
    return kept


def _visible(memory: StoredMemory, user_id: int | None) -> bool:
    return memory.scope == "persona" or (user_id is not None and memory.user_id == user_id)
