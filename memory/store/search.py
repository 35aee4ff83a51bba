"""Retrievable memories: persona knowledge and viewers' long-term memories, with the lexical
index (SQLite FTS5 trigram + bm25; PostgreSQL pg_trgm through ILIKE)."""

from __future__ import annotations

import functools
import operator
from typing import Any

from sqlalchemy import ColumnElement, case, column, delete, func, insert, or_, select, table
from sqlalchemy.ext.asyncio import AsyncSession

from memory.models import Memory, Message
from memory.store.database import Database
from memory.store.records import NewMemory, StoredMemory

# The FTS5 table made by migration 0002 (raw SQL, so not part of the ORM metadata).
_FTS = table("memories_fts", column("rowid"), column("memories_fts"))
_FTS_VOCAB = table("memories_fts_vocab", column("term"), column("doc"))
# What a search result holds of a memory (not its embedding).
_STORED = (Memory.id, Memory.scope, Memory.persona_id, Memory.user_id, Memory.text,
           Memory.source)


class Memories:
    def __init__(self, db: Database) -> None:
        self._db = db

    async def add_memories(self, items: list[NewMemory]) -> list[int]:
        if not items:
            return []
        rows = [{"scope": i.scope, "persona_id": i.persona_id, "user_id": i.user_id,
                 "text": i.text, "source": i.source, "source_hash": i.source_hash,
                 "embedding": i.embedding} for i in items]
        async with self._db.write() as session:
            ids = await session.execute(
                insert(Memory).returning(Memory.id, sort_by_parameter_order=True), rows)
            return list(ids.scalars())

    async def add_message_memory(self, item: NewMemory, message_id: int) -> int | None:
        """A viewer's memory of their message ``message_id`` (whose text is ``item.text``),
        for whoever holds that message now, looked up in the same transaction: after a
        ``/forget`` or a moderator's delete while its reply was generating it is not stored
        (None); after a link it follows the message to the linked viewer."""
        async with self._db.write() as session:
            # A purged message keeps its row but not its text: only the very text counts.
            owner = await session.scalar(select(Message.user_id).where(
                Message.id == message_id, Message.content == item.text))
            if owner is None:
                return None
            added = await session.execute(insert(Memory).values(
                scope="user", persona_id=item.persona_id, user_id=owner, text=item.text,
                source=f"message:{message_id}", embedding=item.embedding,
            ).returning(Memory.id))
            return int(added.scalar_one())

    async def source_hashes(self, persona_id: str, scope: str = "persona") -> dict[str, str]:
        async with self._db.read() as session:
            rows = await session.execute(
                select(Memory.source, Memory.source_hash)
                .where(Memory.persona_id == persona_id, Memory.scope == scope)
                .distinct())
            return {r.source: r.source_hash or "" for r in rows}

    async def delete_sources(self, persona_id: str, sources: list[str]) -> int:
        if not sources:
            return 0
        async with self._db.write() as session:
            result = await session.execute(
                delete(Memory).where(Memory.persona_id == persona_id,
                                     Memory.source.in_(sources)))
            return int(getattr(result, "rowcount", 0) or 0)

    async def memory_vectors(self, persona_id: str, after_id: int = 0,
                             batch: int = 50_000) -> list[tuple[int, int | None, bytes]]:
        """(id, user_id, embedding) of memories newer than ``after_id`` (for the vector index)."""
        async with self._db.read() as session:
            rows = await session.execute(
                select(Memory.id, Memory.user_id, Memory.embedding)
                .where(Memory.persona_id == persona_id, Memory.id > after_id,
                       Memory.embedding.is_not(None))
                .order_by(Memory.id)
                .limit(batch))
            return [(r.id, r.user_id, r.embedding) for r in rows if r.embedding is not None]

    async def memory_ids(self, persona_id: str) -> set[int]:
        async with self._db.read() as session:
            return set(await session.scalars(
                select(Memory.id).where(Memory.persona_id == persona_id)))

    async def get_memories(self, ids: list[int]) -> dict[int, StoredMemory]:
        if not ids:
            return {}
        async with self._db.read() as session:
            rows = await session.execute(select(*_STORED).where(Memory.id.in_(ids)))
            return {row.id: _stored(row) for row in rows}

    async def viewer_memories(self, persona_id: str, user_id: int,
                              limit: int) -> list[StoredMemory]:
        """One viewer's own long-term memories, newest first (what ``/memory`` shows)."""
        async with self._db.read() as session:
            rows = await session.execute(
                select(*_STORED)
                .where(Memory.persona_id == persona_id, Memory.user_id == user_id,
                       Memory.scope == "user")
                .order_by(Memory.id.desc())
                .limit(limit))
            return [_stored(row) for row in rows]

    async def delete_viewer_memory(self, persona_id: str, user_id: int,
                                   memory_id: int) -> bool:
        """Delete one of the viewer's own memories; False when ``memory_id`` is not theirs
        (or gone): nobody forgets another viewer's memory by guessing its number."""
        async with self._db.write() as session:
            result = await session.execute(
                delete(Memory).where(Memory.id == memory_id, Memory.persona_id == persona_id,
                                     Memory.user_id == user_id, Memory.scope == "user"))
            return bool(getattr(result, "rowcount", 0))

    async def lexical_search(self, terms: list[str], persona_id: str, user_id: int | None,
                             limit: int) -> list[int]:
        """Memory ids ranked by lexical match: FTS5 trigram + bm25 on SQLite for terms of 3+
        characters; otherwise (and on PostgreSQL, through the pg_trgm index) by how many
        terms each text contains."""
        if not terms:
            return []
        long_terms = [t for t in terms if len(t) >= 3]
        async with self._db.read() as session:
            if self._db.dialect == "sqlite" and long_terms:
                return await _fts_search(session, long_terms, persona_id, user_id, limit)
            return await _contains_search(session, terms, persona_id, user_id, limit)


    async def viewer_memory_search(self, terms: list[str], persona_id: str, user_id: int,
                                   limit: int) -> list[int]:
        """One viewer's own memories ranked by how many ``terms`` each contains (newest
        first among equals): a scan of that viewer's rows only."""
        if not terms:
            return []
        contains = [Memory.text.contains(t, autoescape=True) for t in terms]
        hits = functools.reduce(operator.add, (case((c, 1), else_=0) for c in contains))
        async with self._db.read() as session:
            rows = await session.execute(
                select(Memory.id)
                .where(Memory.persona_id == persona_id, Memory.user_id == user_id,
                       or_(*contains))
                .order_by(hits.desc(), Memory.id.desc())
                .limit(limit))
            return [r.id for r in rows]


def _stored(row: Any) -> StoredMemory:
    return StoredMemory(id=row.id, scope=row.scope, persona_id=row.persona_id,
                        user_id=row.user_id, text=row.text, source=row.source)


def _visible_to(user_id: int | None) -> ColumnElement[bool]:
    return or_(Memory.scope == "persona", Memory.user_id == user_id)


async def _fts_search(session: AsyncSession, terms: list[str], persona_id: str,
                      user_id: int | None, limit: int) -> list[int]:
    chosen, ranked = await _selective_terms(session, terms)
    if not chosen:
        return []
    match = " OR ".join('"' + t.replace('"', '""') + '"' for t in chosen)
    # bm25 scores every match; for terms that match most documents that is a pass over the
    # index, so those fall back to newest-first (cheap, bounded).
    order = func.bm25(_FTS.c.memories_fts) if ranked else _FTS.c.rowid.desc()
    rows = await session.execute(
        select(Memory.id)
        .join(_FTS, _FTS.c.rowid == Memory.id)
        .where(_FTS.c.memories_fts.match(match), Memory.persona_id == persona_id,
               _visible_to(user_id))
        .order_by(order)
        .limit(limit))
    return [r.id for r in rows]


async def _contains_search(session: AsyncSession, terms: list[str], persona_id: str,
                           user_id: int | None, limit: int) -> list[int]:
    contains = [Memory.text.icontains(t, autoescape=True) for t in terms]
    hits = functools.reduce(operator.add, (case((c, 1), else_=0) for c in contains))
    rows = await session.execute(
        select(Memory.id)
        .where(Memory.persona_id == persona_id, _visible_to(user_id), or_(*contains))
        .order_by(hits.desc(), Memory.id.desc())
        .limit(limit))
    return [r.id for r in rows]


async def _selective_terms(session: AsyncSession, terms: list[str]) -> tuple[list[str], bool]:
    """Terms worth matching, and whether to rank them by bm25. Terms found in over 5% of
    documents are left out (stop-word-like: scoring them is a pass over most of the index and
    says little). A term's frequency is bounded by its rarest trigram; a term with an unknown
    trigram cannot match and is dropped. If every term is common, the two rarest are kept and
    ranked newest-first instead of by bm25."""
    grams = {t: {t.casefold()[i:i + 3] for i in range(len(t) - 2)} for t in terms}
    rows = await session.execute(
        select(_FTS_VOCAB.c.term, _FTS_VOCAB.c.doc)
        .where(_FTS_VOCAB.c.term.in_(set().union(*grams.values()))))
    docs = {term: doc for term, doc in rows}
    frequency = {t: min(docs.get(g, 0) for g in grams[t]) for t in terms}
    known = [t for t in terms if frequency[t] > 0]
    if not known:
        return [], False
    total = await session.scalar(select(func.count()).select_from(Memory)) or 0
    selective = [t for t in known if frequency[t] <= max(50, 0.05 * total)]
    if selective:
        return selective, True
    return sorted(known, key=frequency.__getitem__)[:2], False
