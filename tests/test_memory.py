"""RAG, delete/export and moderation purge, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text

from memory.models import Base
from memory.rag import MemoryRetriever, lexical_terms
from memory.store import IntakeItem, StateChange, StateSnapshot, Store
from tests.store_reads import get_state, messages_for, record_incoming, unlink_identity

KNOWLEDGE = {
    "home.md": "# 燈塔\n佩兒住在海邊的舊燈塔，每天晚上修理燈塔的燈。\n",
    "stars.md": "# 星圖\n佩兒最喜歡的星座是天蠍座，她用藍色墨水畫星圖。\n",
    "food.md": "# Food\nPell loves warm pumpkin soup on stormy nights.\n",
    "music.md": "# Music\nPell plays a small accordion during the weekend streams.\n",
}


@pytest.fixture(scope="module")
def embedder() -> Any:
    from engine.config import EmbeddingConfig
    from engine.embedder import Embedder

    return Embedder(EmbeddingConfig())


@pytest.fixture
def knowledge(tmp_path: Path) -> Path:
    folder = tmp_path / "knowledge"
    folder.mkdir()
    for name, body in KNOWLEDGE.items():
        (folder / name).write_text(body, encoding="utf-8")
    return folder


async def test_chinese_query_finds_chinese_chunk_lexically(store: Store, embedder: Any,
                                                           knowledge: Path) -> None:
    retriever = MemoryRetriever(store, "pell", embedder)
    report = await retriever.index_knowledge(knowledge)
    assert report.added_chunks == 4
    results = await retriever.search("佩兒最喜歡哪個星座？")
    assert results[0].source == "knowledge:stars.md"
    assert results[0].lexical_rank == 0
    home = await retriever.search("你住在燈塔嗎")
    assert home[0].source == "knowledge:home.md"


async def test_english_query_finds_english_chunk_by_meaning(store: Store, embedder: Any,
                                                            knowledge: Path) -> None:
    retriever = MemoryRetriever(store, "pell", embedder)
    await retriever.index_knowledge(knowledge)
    query = "What does she like to eat when the weather is bad?"
    assert not set(lexical_terms(query)) & {"soup", "pumpkin", "stormy"}
    results = await retriever.search(query)
    assert results[0].source == "knowledge:food.md"
    assert results[0].dense_rank == 0
    assert {"id", "score", "source"} <= set(results[0].trace())


async def test_an_unrelated_message_retrieves_nothing(store: Store, embedder: Any,
                                                     knowledge: Path) -> None:
    """The relevance floor: without it the nearest chunks join every prompt."""
    retriever = MemoryRetriever(store, "pell", embedder)
    await retriever.index_knowledge(knowledge)
    assert await retriever.search("How do I file quarterly VAT returns for a GmbH?") == []
    floorless = MemoryRetriever(store, "pell", embedder, min_similarity=-1.0)
    assert len(await floorless.search("How do I file quarterly VAT returns for a GmbH?")) > 0


async def test_reindex_skips_unchanged_and_drops_removed(store: Store, embedder: Any,
                                                         knowledge: Path) -> None:
    retriever = MemoryRetriever(store, "pell", embedder)
    await retriever.index_knowledge(knowledge)
    (knowledge / "music.md").unlink()
    (knowledge / "food.md").write_text("# Food\nPell now prefers hot cocoa.\n", "utf-8")
    report = await retriever.index_knowledge(knowledge)
    assert (report.added_chunks, report.unchanged_files, report.removed_files) == (1, 2, 1)
    sources = {r.source for r in await retriever.search("accordion cocoa weekend", k=10)}
    assert "knowledge:music.md" not in sources
    assert "knowledge:food.md" in sources


async def test_a_viewer_asking_in_other_words_finds_what_they_said(store: Store) -> None:
    """Chinese questions rarely repeat three characters of the sentence they ask about
    ("我家那隻叫什麼？" about "我家的貓叫麻糬"); among a viewer's own memories two-character
    words are enough, and newer chatter or another viewer's cat never wins over it."""
    ann = await store.resolve_user("twitch", "ann", "Ann")
    bob = await store.resolve_user("twitch", "bob", "Bob")
    retriever = MemoryRetriever(store, "pell", embedder=None, k=1)
    await retriever.remember(ann, "跟你說，我家的貓叫麻糬，超級黏人", "message:1")
    for index, chatter in enumerate(["今天的直播好好笑，聊天室也好熱鬧",
                                     "剛下班回家，外面下好大的雨", "晚餐吃了拉麵，湯頭很濃"]):
        await retriever.remember(ann, chatter, f"message:{index + 2}")
    await retriever.remember(bob, "我家的貓叫布丁，牠很愛睡覺", "message:9")
    [found] = await retriever.search("我家那隻叫什麼來著？", user_id=ann)
    assert "麻糬" in found.text


async def test_a_line_said_often_takes_one_place_in_the_prompt(store: Store) -> None:
    ann = await store.resolve_user("twitch", "ann", "Ann")
    retriever = MemoryRetriever(store, "pell", embedder=None, k=2)
    await retriever.remember(ann, "最近每天都在玩薩爾達，停不下來", "message:1")
    for index in range(5):
        await retriever.remember(ann, "遊戲打到一半就睡著了哈哈", f"message:{index + 2}")
    found = [m.text for m in await retriever.search("我最近迷上的那款遊戲是什麼？",
                                                    user_id=ann)]
    assert sorted(found) == sorted(["最近每天都在玩薩爾達，停不下來", "遊戲打到一半就睡著了哈哈"])


async def test_user_memories_are_scoped_to_their_user(store: Store, embedder: Any) -> None:
    ann = await store.resolve_user("discord", "ann", "Ann")
    bob = await store.resolve_user("discord", "bob", "Bob")
    retriever = MemoryRetriever(store, "pell", embedder)
    await retriever.remember(ann, "My cat is called Mochi.", "message:1")
    mine = await retriever.search("what is my cat called", user_id=ann)
    theirs = await retriever.search("what is my cat called", user_id=bob)
    assert any("Mochi" in r.text for r in mine)
    assert not any("Mochi" in r.text for r in theirs)


async def test_memories_survive_reopen(db_url: str, embedder: Any, knowledge: Path) -> None:
    first = await Store.open(db_url)
    await MemoryRetriever(first, "pell", embedder).index_knowledge(knowledge)
    await first.close()
    again = await Store.open(db_url)
    try:
        results = await MemoryRetriever(again, "pell", embedder).search("天蠍座")
        assert results and results[0].source == "knowledge:stars.md"
    finally:
        await again.close()


MARK = "zq-unique-marker-7731"


async def _populate(store: Store, embedder: Any) -> int:
    user = await store.resolve_user("discord", f"{MARK}-id", f"{MARK} name")
    message_id = await record_incoming(store,
        user_id=user, persona_id="pell", platform="discord", channel_id="c",
        platform_message_id=f"{MARK}-msg", text=f"hello {MARK}",
        created_at=datetime.now(UTC))

    def rule(before: StateSnapshot) -> StateChange:
        return StateChange(before, f"cause {MARK}")

    await store.complete_exchange(user_message_id=message_id, reply_text=f"hi {MARK}",
                                  trace={"note": MARK}, platform_message_id=None,
                                  default_mood="calm", rule=rule, created_at=datetime.now(UTC))
    await MemoryRetriever(store, "pell", embedder).remember(user, f"{MARK} likes tea",
                                                            f"message:{message_id}")
    other = await store.resolve_user("discord", "someone-else", "Other")
    await record_incoming(store, user_id=other, persona_id="pell", platform="discord",
                                channel_id="c", platform_message_id="x", text="unrelated",
                                created_at=datetime.now(UTC))
    return user


async def _rows_mentioning(store: Store, user_id: int) -> list[str]:
    found = []
    async with store.database.read() as session:
        for table in Base.metadata.sorted_tables:
            for row in (await session.execute(select(table))).mappings():
                for key, value in row.items():
                    about_user = (key == "user_id" or (table.name == "users" and key == "id"))
                    if (about_user and value == user_id) or MARK in str(value):
                        found.append(f"{table.name}.{key}")
        if store.dialect == "sqlite":
            hits = await session.execute(
                text("SELECT rowid FROM memories_fts WHERE memories_fts MATCH :q"),
                {"q": f'"{MARK}"'})
            found += [f"memories_fts:{r[0]}" for r in hits]
    return found


async def test_export_then_delete_leaves_nothing(store: Store, embedder: Any) -> None:
    user = await _populate(store, embedder)
    assert await _rows_mentioning(store, user)
    export = await store.export_user_data(user)
    assert {name: len(rows) for name, rows in export.items()} == {
        "users": 1, "identities": 1, "relationship_states": 1, "memories": 1, "messages": 2,
        "state_events": 1,
    }
    assert MARK in str(export)
    counts = await store.delete_user_data(user)
    assert sum(counts.values()) == 7
    assert await _rows_mentioning(store, user) == []
    assert await store.find_user("discord", "someone-else") is not None


async def test_moderation_purge(store: Store, embedder: Any) -> None:
    user = await _populate(store, embedder)
    assert await store.purge_platform_message("discord", f"{MARK}-msg") == 1
    rows = await messages_for(store, user)
    assert rows[0].status == "purged" and rows[0].content == ""
    retriever = MemoryRetriever(store, "pell", embedder)
    assert not [r for r in await retriever.search("likes tea", user_id=user) if MARK in r.text]


async def test_concurrent_searches_share_the_index(store: Store, embedder: Any,
                                                   knowledge: Path) -> None:
    retriever = MemoryRetriever(store, "pell", embedder)
    await retriever.index_knowledge(knowledge)
    results = await asyncio.gather(*(retriever.search("天蠍座") for _ in range(8)))
    assert all(r[0].source == "knowledge:stars.md" for r in results)


async def test_link_identity_merges_history_and_state(store: Store) -> None:
    from dataclasses import replace as dc_replace

    def bump(before: StateSnapshot) -> StateChange:
        return StateChange(dc_replace(before, intimacy=before.intimacy + 5,
                                      conversation_count=before.conversation_count + 1), "+5")

    discord_user = await store.resolve_user("discord", "42", "Ann")
    twitch_user = await store.resolve_user("twitch", "ann_tv", "ann_tv")
    for user in (discord_user, twitch_user):
        await record_incoming(store, user_id=user, persona_id="pell", platform="x",
                                    channel_id="c", platform_message_id=None,
                                    text=f"hello from {user}", created_at=datetime.now(UTC))
    await store.update_state(discord_user, "pell", "calm", bump)
    for _ in range(2):
        await store.update_state(twitch_user, "pell", "calm", bump)
    assert await store.link_identity(discord_user, "twitch", "ann_tv", "ann_tv") == discord_user
    assert await store.find_user("twitch", "ann_tv") == discord_user
    assert len(await messages_for(store, discord_user)) == 2
    state = await get_state(store, discord_user, "pell", "calm")
    assert state.conversation_count == 3 and state.intimacy == 10
    async with store.database.read() as session:
        users = (await session.execute(text("SELECT id FROM users"))).all()
    assert [row[0] for row in users] == [discord_user]
    separate = await unlink_identity(store, "twitch", "ann_tv")
    assert separate is not None and separate != discord_user
    assert await store.find_user("discord", "42") == discord_user


async def _remember_said(store: Store, retriever: MemoryRetriever, user: int, message_id: str,
                         words: str) -> int:
    [outcome] = await store.intake([IntakeItem(
        "twitch", f"viewer-{user}", "v", "pell", "c", message_id, words,
        datetime.now(UTC))])
    assert outcome.message_id is not None
    return await retriever.remember(user, words, f"message:{outcome.message_id}")


def _texts(results: list[Any]) -> str:
    return " | ".join(r.text for r in results)


@pytest.mark.parametrize("invalidate", [True, False], ids=["invalidated", "stale-index"])
async def test_purge_then_another_viewers_memory_does_not_leak(store: Store, embedder: Any,
                                                               invalidate: bool) -> None:
    retriever = MemoryRetriever(store, "pell", embedder, k=5)
    a = await store.resolve_user("twitch", "viewer-a", "A")
    c = await store.resolve_user("twitch", "viewer-c", "C")
    await _remember_said(store, retriever, a, "a-1", "my cat Mochi sleeps by the lighthouse")
    assert "Mochi" in _texts(await retriever.search("where does my cat sleep", user_id=a))
    assert await store.purge_platform_message("twitch", "a-1") == 1
    if invalidate:
        retriever.invalidate()
    # On SQLite the freed highest id may be handed to the next memory: viewer C's.
    await _remember_said(store, retriever, c, "c-1", "C: my home address is 12 Harbour Road")
    seen_by_a = _texts(await retriever.search("my home address and my cat", user_id=a))
    assert "Harbour" not in seen_by_a and "Mochi" not in seen_by_a
    assert "Harbour" in _texts(await retriever.search("my home address", user_id=c))


@pytest.mark.parametrize("invalidate", [True, False], ids=["invalidated", "stale-index"])
async def test_forget_then_a_new_viewer_sees_nothing_of_others(store: Store, embedder: Any,
                                                               invalidate: bool) -> None:
    retriever = MemoryRetriever(store, "pell", embedder, k=5)
    a = await store.resolve_user("twitch", "viewer-a", "A")
    c = await store.resolve_user("twitch", "viewer-c", "C")
    await _remember_said(store, retriever, c, "c-1", "C: my phone number is 0912 345 678")
    await _remember_said(store, retriever, a, "a-1", "A: my password hint is lighthouse")
    await retriever.search("phone number", user_id=a)  # warm the dense index
    await store.delete_user_data(a)
    if invalidate:
        retriever.invalidate()
    newcomer = await store.resolve_user("twitch", "viewer-b", "B")  # may get A's old id
    seen = _texts(await retriever.search("my phone number and password hint",
                                         user_id=newcomer))
    assert "0912" not in seen and "password" not in seen
    # Deleted text is not retrievable by anyone, lexically or by meaning.
    assert "password" not in _texts(await retriever.search("password hint lighthouse",
                                                           user_id=c))


async def test_linked_then_unlinked_viewer_keeps_memories_apart(store: Store,
                                                                embedder: Any) -> None:
    retriever = MemoryRetriever(store, "pell", embedder, k=5)
    main = await store.resolve_user("discord", "ann", "Ann")
    alt = await store.resolve_user("twitch", "viewer-alt", "Ann")
    await _remember_said(store, retriever, alt, "alt-1", "I secretly collect sea glass")
    await store.link_identity(main, "twitch", "viewer-alt", "Ann")
    retriever.invalidate()
    assert "sea glass" in _texts(await retriever.search("what do I collect", user_id=main))
    separate = await unlink_identity(store, "twitch", "viewer-alt")
    assert separate is not None and separate != main
    retriever.invalidate()
    assert "sea glass" not in _texts(await retriever.search("what do I collect",
                                                            user_id=separate))


async def test_a_memory_of_a_forgotten_message_never_reaches_the_next_viewer(
        store: Store) -> None:
    """/forget while the reply was generating: the memory written after it is dropped, even
    where SQLite hands the forgotten viewer's id to the next new viewer."""
    from datetime import UTC, datetime

    from memory.store import IntakeItem

    def said(user: str, text: str, message_id: str) -> IntakeItem:
        return IntakeItem(platform="twitch", platform_user_id=user, display_name=user,
                          persona_id="pell", channel_id="c", platform_message_id=message_id,
                          text=text, created_at=datetime.now(UTC))

    [ann] = await store.intake([said("ann", "我家的貓叫麻糬", "m1")])
    await store.delete_user_data(ann.user_id)  # /forget, the reply still generating
    [bob] = await store.intake([said("bob", "hi", "m2")])
    retriever = MemoryRetriever(store, "pell", None)
    assert ann.message_id is not None
    assert await retriever.remember_message(ann.user_id, ann.message_id,
                                            "我家的貓叫麻糬") is None
    export = await store.export_user_data(bob.user_id)
    assert "麻糬" not in str(export)


async def test_a_memory_of_a_message_moved_by_a_link_follows_it(store: Store) -> None:
    from datetime import UTC, datetime

    from memory.store import IntakeItem

    [tv] = await store.intake([IntakeItem(
        platform="twitch", platform_user_id="ann_tv", display_name="ann", persona_id="pell",
        channel_id="c", platform_message_id="m1", text="我明天要考試",
        created_at=datetime.now(UTC))])
    main = await store.resolve_user("discord", "ann", "Ann")
    await store.link_identity(main, "twitch", "ann_tv", "ann")  # while the reply generated
    assert tv.message_id is not None
    memory_id = await MemoryRetriever(store, "pell", None).remember_message(
        tv.user_id, tv.message_id, "我明天要考試")
    assert memory_id is not None
    assert (await store.get_memories([memory_id]))[memory_id].user_id == main


def test_the_dense_index_scores_only_what_its_viewer_may_see() -> None:
    """The persona's knowledge and the asker's own memories, never another viewer's, however
    near; a memory deleted from the store leaves the index with ``keep_only``."""
    import numpy as np

    from memory.rag import VectorIndex

    def blob(*values: float) -> bytes:
        vector = np.asarray(values, dtype=np.float32)
        return (vector / np.linalg.norm(vector)).tobytes()

    index = VectorIndex()
    index.add([(1, None, blob(1, 0)), (2, 7, blob(0.9, 0.1)), (3, 8, blob(1, 0))])
    index.add([(4, 7, blob(0, 1))])  # a later memory joins its owner's rows only
    query = np.asarray([1, 0], dtype=np.float32)
    assert index.search(query, 7, limit=5) == [1, 2, 4]
    assert index.search(query, 8, limit=5) == [1, 3]
    assert index.search(query, None, limit=5) == [1]
    assert index.search(query, 7, limit=5, min_similarity=0.5) == [1, 2]
    index.keep_only({1, 4})
    assert index.search(query, 7, limit=5) == [1, 4] and len(index) == 2
    assert index.last_id == 4
