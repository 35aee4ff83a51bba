"""The store suite, run on SQLite and on a real PostgreSQL server (see conftest.db_url)."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from memory import migrate
from memory.errors import SchemaTooNewError, StoreError
from memory.store import IntakeItem, StateChange, StateSnapshot, Store
from tests.read_only import run_read_only
from tests.store_reads import get_state, messages_for, recent_history, record_incoming

NOW = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)


def bump_intimacy(before: StateSnapshot) -> StateChange:
    return StateChange(replace(before, intimacy=before.intimacy + 1,
                               conversation_count=before.conversation_count + 1), "test +1")


async def _exchange(store: Store, user_id: int, text: str, reply: str) -> int:
    message_id = await record_incoming(store,
        user_id=user_id, persona_id="pell", platform="console", channel_id="c",
        platform_message_id=None, text=text, created_at=NOW,
    )
    await store.complete_exchange(
        user_message_id=message_id, reply_text=reply, trace={"k": 1},
        platform_message_id=None, default_mood="calm", rule=bump_intimacy, created_at=NOW,
    )
    return message_id


async def test_identity_is_stable(store: Store) -> None:
    first = await store.resolve_user("discord", "42", "Ann")
    again = await store.resolve_user("discord", "42", "Ann (renamed)")
    other = await store.resolve_user("twitch", "42", "Ann")
    assert first == again != other


async def test_concurrent_identity_creation_yields_one_user(store: Store) -> None:
    ids = await asyncio.gather(*(store.resolve_user("twitch", "race", "r") for _ in range(10)))
    assert len(set(ids)) == 1


async def test_history_is_ordered_and_excludes_unanswered(store: Store) -> None:
    user = await store.resolve_user("console", "viewer", "viewer")
    await _exchange(store, user, "one", "reply one")
    await _exchange(store, user, "two", "reply two")
    await record_incoming(store, user_id=user, persona_id="pell", platform="console",
                                channel_id="c", platform_message_id=None, text="pending",
                                created_at=NOW)
    history = await recent_history(store, user, "pell", limit=10)
    assert [(h.role, h.content) for h in history] == [
        ("user", "one"), ("assistant", "reply one"), ("user", "two"), ("assistant", "reply two"),
    ]
    assert [h.content for h in await recent_history(store, user, "pell", limit=2)] == [
        "two", "reply two",
    ]


async def test_exchange_updates_state_and_audit(store: Store) -> None:
    user = await store.resolve_user("console", "viewer", "viewer")
    message_id = await _exchange(store, user, "hi", "hello")
    state = await get_state(store, user, "pell", "calm")
    assert state.conversation_count == 1 and state.intimacy == 1 and state.version == 1
    question = await store.get_message(message_id)
    assert question is not None and question.status == "answered"
    stats = await store.stats("console", "viewer", "pell", "calm")
    assert stats is not None and stats["conversation_count"] == 1


async def test_500_concurrent_updates_are_all_applied(store: Store) -> None:
    user = await store.resolve_user("discord", "hot", "hot")

    async def worker() -> None:
        for _ in range(25):
            await store.update_state(user, "pell", "calm", bump_intimacy)

    await asyncio.gather(*(worker() for _ in range(20)))
    state = await get_state(store, user, "pell", "calm")
    assert state.intimacy == 500
    assert state.version == 500


async def test_data_survives_reopen(db_url: str) -> None:
    store = await Store.open(db_url)
    user = await store.resolve_user("console", "viewer", "viewer")
    await _exchange(store, user, "remember me", "I will")
    await store.close()
    reopened = await Store.open(db_url)
    try:
        history = await recent_history(reopened, user, "pell", limit=10)
        assert [h.content for h in history] == ["remember me", "I will"]
        assert (await get_state(reopened, user, "pell", "calm")).conversation_count == 1
    finally:
        await reopened.close()


async def test_migrations_round_trip_without_drift(db_url: str) -> None:
    await migrate.upgrade_to_head(db_url)
    await migrate.check(db_url)  # raises if models and migrations disagree
    await migrate.downgrade(db_url, "base")
    assert await migrate.current_revisions(db_url) == ()
    await migrate.upgrade_to_head(db_url)
    assert len(await migrate.current_revisions(db_url)) == 1


async def test_newer_schema_is_refused(db_url: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    await migrate.upgrade_to_head(db_url)
    engine = create_async_engine(db_url)
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE alembic_version SET version_num = 'f00dfeed9999'"))
    await engine.dispose()
    with pytest.raises(SchemaTooNewError, match="newer than this program"):
        await Store.open(db_url)


async def test_not_a_sqlite_file_is_left_untouched(tmp_path: Path) -> None:
    path = tmp_path / "notes.db"
    path.write_text("my precious notes", encoding="utf-8")
    with pytest.raises(StoreError, match="not a SQLite database"):
        await Store.open(f"sqlite+aiosqlite:///{path}")
    assert path.read_text(encoding="utf-8") == "my precious notes"


async def test_read_only_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    path = folder / "ro.db"
    store = await Store.open(f"sqlite+aiosqlite:///{path}")
    await store.close()
    if os.geteuid() != 0:
        path.chmod(stat.S_IRUSR)
        with pytest.raises(StoreError, match="read-only"):
            await Store.open(f"sqlite+aiosqlite:///{path}")
        return
    opener = ("import asyncio, sys\nfrom memory.store import Store\n"
              "asyncio.run(Store.open(sys.argv[1]))")
    result = await asyncio.to_thread(run_read_only, folder, [
        sys.executable, "-c", opener, f"sqlite+aiosqlite:///{path}"])
    assert "StoreError" in result.stderr and "is read-only" in result.stderr, result.stderr


async def test_reads_are_deferred_and_writes_take_the_lock_on_sqlite(tmp_path: Path) -> None:
    from sqlalchemy import Engine, event

    begins: list[str] = []

    def trace(dbapi_connection: Any, _record: object) -> None:
        # SQLite's own trace: the store issues BEGIN straight to the driver.
        raw = getattr(dbapi_connection, "driver_connection", dbapi_connection)
        raw = getattr(raw, "_conn", raw)  # aiosqlite's sqlite3 connection
        raw.set_trace_callback(
            lambda statement: begins.append(statement) if statement.startswith("BEGIN") else None)

    event.listen(Engine, "connect", trace)  # connections are opened lazily: keep it on
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'kinds.db'}")
    try:
        begins.clear()
        user = await store.resolve_user("console", "viewer", "viewer")
        assert begins == ["BEGIN IMMEDIATE"]
        begins.clear()
        assert await store.find_user("console", "viewer") == user
        await recent_history(store, user, "pell", 5)
        assert begins == ["BEGIN", "BEGIN"]
    finally:
        event.remove(Engine, "connect", trace)
        await store.close()


async def test_records_handed_out_are_frozen(store: Store) -> None:
    from dataclasses import FrozenInstanceError

    user = await store.resolve_user("console", "viewer", "viewer")
    message_id = await _exchange(store, user, "hi", "hello")
    message = await store.get_message(message_id)
    assert message is not None and message.status == "answered"
    with pytest.raises(FrozenInstanceError):
        message.content = "changed"  # type: ignore[misc]


def _item(text: str, message_id: str | None, user: str = "ann", **kwargs: Any) -> IntakeItem:
    return IntakeItem(platform="twitch", platform_user_id=user, display_name=user,
                      persona_id="pell", channel_id="c1", platform_message_id=message_id,
                      text=text, created_at=NOW, **kwargs)


async def test_intake_is_idempotent_per_platform_message(store: Store) -> None:
    first = await store.intake([_item("hi", "m1"), _item("yo", "m2", user="bob"),
                                _item("no id", None)])
    assert all(not o.duplicate for o in first)
    assert first[0].user_id == first[2].user_id != first[1].user_id
    again = await store.intake([_item("hi", "m1"), _item("new", "m3")])
    assert again[0].duplicate and not again[1].duplicate
    assert again[0].user_id == first[0].user_id
    rows = await messages_for(store, first[0].user_id)
    assert sorted(r.content for r in rows) == ["hi", "new", "no id"]


async def test_intake_of_concurrent_batches_makes_one_user_per_viewer(store: Store) -> None:
    batches = [[_item(f"{n}", f"m{n}-{i}", user=f"v{i}") for i in range(5)] for n in range(6)]
    outcomes = await asyncio.gather(*(store.intake(batch) for batch in batches))
    users = {o.user_id for batch in outcomes for o in batch}
    assert len(users) == 5
    assert {await store.find_user("twitch", f"v{i}") for i in range(5)} == users


async def test_final_states_keep_their_reason(store: Store) -> None:
    [dropped, waiting] = await store.intake([
        _item("spam", "m1", status="dropped", reason="rate_limited"), _item("hi", "m2")])
    assert await store.expire_received("crash") == 1
    user = dropped.user_id
    rows = {r.content: (r.status, r.status_reason) for r in await messages_for(store, user)}
    assert rows == {"spam": ("dropped", "rate_limited"), "hi": ("expired", "crash")}
    assert waiting.message_id is not None


async def test_driver_errors_leave_the_store_as_store_error(store: Store) -> None:
    await store.close()  # a disposed engine reconnects; a dropped schema is a driver error
    broken = await Store.open(store.url, auto_migrate=False)
    try:
        async with broken.database.write() as session:
            from sqlalchemy import text

            await session.execute(text("DROP TABLE state_events"))
        with pytest.raises(StoreError):
            await broken.state_timeline(1, "pell")
    finally:
        await broken.close()


async def test_a_message_purged_while_answered_stays_purged(store: Store) -> None:
    [outcome] = await store.intake([_item("my secret", "secret-1")])
    assert outcome.message_id is not None
    assert await store.purge_platform_message("twitch", "secret-1") == 1
    await store.complete_exchange(
        user_message_id=outcome.message_id, reply_text="ok", trace={},
        platform_message_id=None, default_mood="calm", rule=bump_intimacy, created_at=NOW)
    question = await store.get_message(outcome.message_id)
    assert question is not None and (question.status, question.content) == ("purged", "")


async def test_a_purge_takes_the_replies_that_may_quote_it_along(store: Store) -> None:
    """A reply to a purged message, stored before the purge or while it was generated,
    keeps its row but not its words: later prompts and the viewer's export never show it."""
    user = await store.resolve_user("twitch", "ann", "ann")
    [before, during] = await store.intake([_item("我的地址是 X", "m-before"),
                                           _item("我的電話是 Y", "m-during")])
    assert before.message_id is not None and during.message_id is not None
    await store.complete_exchange(
        user_message_id=before.message_id, reply_text="你說你的地址是 X 對吧", trace={},
        platform_message_id=None, default_mood="calm", rule=bump_intimacy, created_at=NOW)
    await store.purge_platform_message("twitch", "m-before")
    await store.purge_platform_message("twitch", "m-during")  # while its reply generates
    await store.complete_exchange(
        user_message_id=during.message_id, reply_text="電話 Y 我記住了", trace={},
        platform_message_id=None, default_mood="calm", rule=bump_intimacy, created_at=NOW)
    assert await recent_history(store, user, "pell", limit=10) == []
    exported = await store.export_user_data(user)
    words = " ".join(str(row.get("content")) for row in exported["messages"])
    assert "X" not in words and "Y" not in words
    assert {row["status"] for row in exported["messages"]} == {"purged"}


async def test_upgrading_a_database_with_redelivered_duplicates(db_url: str) -> None:
    """Older versions stored a redelivered platform message twice: 0003 keeps one key."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    await migrate._run(db_url, "upgrade", "0002")
    engine = create_async_engine(db_url)
    async with engine.begin() as conn:
        user = (await conn.execute(text(
            "INSERT INTO users (display_name, created_at) VALUES ('ann', CURRENT_TIMESTAMP) "
            "RETURNING id"))).scalar_one()
        for content in ("hi", "hi again"):
            await conn.execute(text(
                "INSERT INTO messages (user_id, persona_id, role, content, status, platform, "
                "channel_id, platform_message_id, created_at) VALUES (:user, 'pell', 'user', "
                ":content, 'answered', 'twitch', 'c1', 'm-1', CURRENT_TIMESTAMP)"),
                {"content": content, "user": user})
    await engine.dispose()
    await migrate.upgrade_to_head(db_url)
    store = await Store.open(db_url)
    try:
        rows = await messages_for(store, user)
        assert [r.platform_message_id for r in rows] == ["m-1", None]
        [again] = await store.intake([_item("hi", "m-1")])
        assert again.duplicate
    finally:
        await store.close()


async def test_a_state_read_before_another_change_is_not_applied_over_it(store: Store) -> None:
    """The reply path passes the state it read (``seen``) to skip a re-read; when another
    change landed in between (another process, an admin), the rule applies to the stored
    row instead, so no change is lost."""
    user = await store.resolve_user("console", "optimist", "o")
    await _exchange(store, user, "one", "reply one")
    seen = await get_state(store, user, "pell", "calm")
    for question in ("two (first to finish)", "three (read before two finished)"):
        message_id = await record_incoming(store,
            user_id=user, persona_id="pell", platform="console", channel_id="c",
            platform_message_id=None, text=question, created_at=NOW)
        await store.complete_exchange(
            user_message_id=message_id, reply_text="ok", trace={}, platform_message_id=None,
            default_mood="calm", rule=bump_intimacy, created_at=NOW, seen=seen)
    state = await get_state(store, user, "pell", "calm")
    assert (state.conversation_count, state.intimacy, state.version) == (3, 3.0, 3)
    events = await store.state_timeline(user, "pell")
    assert [point.intimacy for point in events] == [1.0, 2.0, 3.0]


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_processes_starting_together_on_a_new_database_migrate_it_once(
        db_url: str) -> None:
    """Several bot processes started at once (a compose profile) all upgrade the new schema:
    one creates it, the others wait and find it current."""
    await asyncio.gather(*(migrate.upgrade_to_head(db_url) for _ in range(4)))
    assert len(await migrate.current_revisions(db_url)) == 1


async def test_the_wal_is_checkpointed_off_the_writers_path(tmp_path: Path) -> None:
    """No writer pays for a checkpoint (SQLite's autocheckpoint is off); the store's own
    thread copies the WAL into the database file within about a second, so it stays small."""

    from memory.store.checkpoint import CHECKPOINT_EVERY_S

    path = tmp_path / "wal.db"
    store = await Store.open(f"sqlite+aiosqlite:///{path}")
    try:
        before = path.stat().st_size
        for batch in range(20):
            await store.intake([_item("星星 " * 100, f"wal-{batch}-{i}") for i in range(50)])
        assert path.with_name("wal.db-wal").stat().st_size > 1_000_000  # all in the WAL
        for _ in range(int(50 * CHECKPOINT_EVERY_S)):  # up to five checkpoint periods
            if path.stat().st_size - before >= 500_000:
                break
            await asyncio.sleep(0.1)
        assert path.stat().st_size - before >= 500_000  # ~1,000 messages moved over
    finally:
        await store.close()



@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_redelivery_past_the_shared_limit_is_a_duplicate_and_changes_nothing(
        store: Store) -> None:
    """The same platform message delivered again (to another process) while the viewer is
    at the shared per-minute limit: a duplicate, and the first delivery, still being
    answered, stays ``received`` (not dropped by the limit check)."""
    [first] = await store.intake([_item("hi", "same-1", shared_per_minute=1)])
    assert first.message_id is not None and first.refused is None
    [again] = await store.intake([_item("hi", "same-1", shared_per_minute=1)])
    assert (again.message_id, again.refused) == (None, None)
    stored = await store.get_message(first.message_id)
    assert stored is not None and stored.status == "received"
    [other] = await store.intake([_item("more", "same-2", shared_per_minute=1)])
    assert other.refused == "rate_limited"  # a new message past the limit is refused


async def test_look_ahead_reads_what_a_reply_needs_before_its_intake_commits(
        store: Any) -> None:
    """SQLite writes a message's intake behind its reply: the store says at once who the
    viewer is, whether the platform message is in already, and the reply's context."""
    from memory.store import ContextWanted

    def item(message_id: str) -> IntakeItem:
        return IntakeItem(platform="twitch", platform_user_id="ann", display_name="Ann",
                          persona_id="pell", channel_id="c", platform_message_id=message_id,
                          text="hi", created_at=datetime.now(UTC))

    wanted = ContextWanted(default_mood="calm", history_limit=10)
    new = await store.look_ahead(item("m1"), wanted)
    # A viewer never seen: no id, nothing recorded, the defaults.
    assert (new.user_id, new.recorded) == (None, False)
    assert new.context.persona_id == "pell" and new.context.history == []
    assert new.context.state.mood == "calm"
    (first,) = await store.intake([item("m1")])
    redelivered = await store.look_ahead(item("m1"), wanted)
    assert (redelivered.user_id, redelivered.recorded) == (first.user_id, True)
    # A known viewer's state and history, as the reply would read them.
    await store.update_state(first.user_id, "pell", "calm", bump_intimacy)
    await _exchange(store, first.user_id, "question", "answer")
    known = await store.look_ahead(item("m2"), wanted)
    assert (known.user_id, known.recorded) == (first.user_id, False)
    assert known.context.state.intimacy == 2  # both bumps
    assert [m.content for m in known.context.history] == ["question", "answer"]
    assert (known.context.state, known.context.history) == await store.reply_context(
        first.user_id, "pell", "calm", 10)


async def test_look_ahead_reads_on_a_store_thread_where_sqlite_would_wait(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The event loop's reads never wait for SQLite's lock: where one would, the same read
    is made on a store thread."""
    from sqlalchemy.exc import OperationalError

    from memory.store import ContextWanted

    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'busy.db'}")
    try:
        (first,) = await store.intake([_item("hi", "m1")])
        threads = store.database._threads

        def locked(*_args: Any) -> Any:
            raise OperationalError("SELECT", {}, Exception("database is locked"))

        monkeypatch.setattr(threads, "read_here", locked)
        ahead = await store.look_ahead(_item("again", "m1"), ContextWanted("calm", 10))
        assert (ahead.user_id, ahead.recorded) == (first.user_id, True)
    finally:
        await store.close()


async def test_a_messages_statements_search_indexes_and_scan_no_table(tmp_path: Path) -> None:
    """Every statement of a message's life on SQLite (what is read ahead of the intake, the
    intake of new and known viewers on two platforms, refusals in bulk, the reply's context,
    the completion), explained by SQLite:
    none scans a whole table or sorts in a temporary b-tree, whose cost would grow with the
    audience. A row-value ``(platform, platform_user_id) IN (...)`` did, for every batch of
    refusals."""
    import re
    import sqlite3

    from sqlalchemy import event

    from memory.store import ContextWanted

    path = tmp_path / "plans.db"
    store = await Store.open(f"sqlite+aiosqlite:///{path}")
    executed: dict[str, Any] = {}

    def keep(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any,
             executemany: bool) -> None:
        many = executemany and parameters and isinstance(parameters[0], (tuple, list))
        executed.setdefault(statement, tuple(parameters[0] if many else parameters))

    wanted = ContextWanted(default_mood="calm", history_limit=10)
    try:
        for engine in store.database.sync_engines:
            event.listen(engine, "before_cursor_execute", keep)
        for round_ in range(2):  # new viewers, then known ones
            asked = [_item(f"hi {round_}", f"m{round_}-{i}", user=f"v{i}") for i in range(3)]
            for item in asked:
                await store.look_ahead(item, wanted)
            outcomes = await store.intake(asked)
            await store.intake_final(
                [_item("spam", f"d{round_}-{i}", user=f"v{i}", status="dropped",
                       reason="busy") for i in range(4)]
                + [replace(_item("spam", f"dd{round_}", user="v0", status="dropped",
                                 reason="busy"), platform="discord")])
            for outcome in outcomes:
                assert outcome.message_id is not None
                await store.reply_context(outcome.user_id, "pell", "calm", 10)
                await store.complete_exchange(
                    user_message_id=outcome.message_id, reply_text="hello", trace={},
                    platform_message_id=None, default_mood="calm", rule=bump_intimacy,
                    created_at=NOW)
    finally:
        for engine in store.database.sync_engines:
            event.remove(engine, "before_cursor_execute", keep)
        await store.close()
    explained = sqlite3.connect(path)
    scans: dict[str, list[str]] = {}
    for statement, parameters in executed.items():
        if not re.match(r"\s*(SELECT|INSERT|UPDATE|DELETE|WITH)", statement, re.IGNORECASE):
            continue
        plan = explained.execute(f"EXPLAIN QUERY PLAN {statement}", parameters).fetchall()
        tables = [detail for *_ids, detail in plan
                  if re.match(r"SCAN (?!(\d+ )?CONSTANT ROWS)|USE TEMP", detail)]
        if tables:
            scans[statement] = tables
    explained.close()
    assert len(executed) > 8  # the hot path ran
    assert scans == {}


async def test_locking_a_viewer_never_waits_on_rows_that_point_at_it(store: Store) -> None:
    """PostgreSQL: intake locks viewers (in id order) while other batches insert messages
    whose foreign keys lock the same viewers (in batch order). Were the two locks in conflict,
    the orders would invert and deadlock; the viewer lock leaves key-share locks alone."""
    from sqlalchemy import text

    from memory.store import statements as sql
    from memory.store.intake import _values

    if store.database.dialect != "postgresql":
        pytest.skip("row locks are PostgreSQL's")
    [ann, bob] = await store.intake([_item("hi", "m1"), _item("yo", "m2", user="bob")])
    engine = store.database.sql_engine
    async with engine.connect() as locker, engine.connect() as inserter:
        await locker.execute(sql.LOCK_USER, {"user_id": ann.user_id})
        await inserter.execute(text("SET lock_timeout = '10s'"))  # only bounds a failure
        for user_id in (bob.user_id, ann.user_id):
            await inserter.execute(sql.intake_message("postgresql", False),
                                   _values(_item("later", None), user_id))
        await inserter.commit()
        await locker.execute(sql.LOCK_USER, {"user_id": bob.user_id})
        await locker.commit()
    assert [r.content for r in await messages_for(store, ann.user_id)].count("later") == 1


async def test_linking_keeps_a_message_committed_while_the_link_runs(store: Store) -> None:
    """PostgreSQL: a message for the identity's old user, written by a transaction that commits
    while the link runs, moves with the rest; it is never deleted with the old user."""
    from sqlalchemy import text

    from memory.store import statements as sql
    from memory.store.intake import _values

    if store.database.dialect != "postgresql":
        pytest.skip("SQLite runs one writer at a time")
    [ann] = await store.intake([_item("hi", "m1")])
    [tv] = await store.intake([_item("yo", "m2", user="ann_tv")])
    engine = store.database.sql_engine
    async with engine.connect() as writer:
        await writer.execute(sql.intake_message("postgresql", False),
                             _values(_item("mid-link", None, user="ann_tv"), tv.user_id))
        link = asyncio.create_task(store.link_identity(ann.user_id, "twitch", "ann_tv", "tv"))
        async with engine.connect() as watcher:  # until the link waits on our row lock
            # The server's state, not ours: nothing to await but its view.
            while not link.done() and not (await watcher.execute(text(  # noqa: ASYNC110
                    "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                    " AND datname = current_database()"))).scalar():
                await asyncio.sleep(0.01)
        await writer.commit()
    await link
    contents = sorted(m.content for m in await messages_for(store, ann.user_id))
    assert contents == ["hi", "mid-link", "yo"]


async def test_a_deleted_viewers_ids_are_never_handed_out_again(store: Store) -> None:
    """The newest viewer forgets themselves: the next new viewer, message and memory get
    ids of their own, so nothing still addressed to the old ones (a reply being generated,
    a memory about to be stored) can land with someone else."""
    from memory.store.records import NewMemory

    ann = await store.resolve_user("console", "ann", "ann")
    bob = await store.resolve_user("console", "bob", "bob")
    last_message = await _exchange(store, bob, "我家的貓叫麻糬", "好可愛的名字")
    [last_memory] = await store.add_memories([NewMemory("user", "pell", "貓叫麻糬", "chat",
                                                        user_id=bob)])
    await store.delete_user_data(bob)
    carl = await store.resolve_user("console", "carl", "carl")
    assert carl > bob
    assert await _exchange(store, ann, "晚安", "晚安～") > last_message
    [memory] = await store.add_memories([NewMemory("user", "pell", "晚安", "chat",
                                                   user_id=ann)])
    assert memory > last_memory


async def test_upgrading_to_monotonic_ids_keeps_every_row_and_the_lexical_index(
        tmp_path: Path) -> None:
    """0006 rebuilds SQLite's tables with AUTOINCREMENT: rows keep their ids, indexes and
    the memories' full-text triggers come back."""
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    db_url = f"sqlite+aiosqlite:///{tmp_path / 'old.db'}"
    await migrate._run(db_url, "upgrade", "0005")
    engine = create_async_engine(db_url)
    async with engine.begin() as conn:
        for name in ("ann", "bob"):
            await conn.execute(text("INSERT INTO users (display_name, created_at) "
                                    "VALUES (:name, CURRENT_TIMESTAMP)"), {"name": name})
        await conn.execute(text(
            "INSERT INTO memories (scope, persona_id, user_id, text, source, created_at) "
            "VALUES ('user', 'pell', 1, '我家的貓叫麻糬', 'chat', CURRENT_TIMESTAMP)"))
    await engine.dispose()
    await migrate.upgrade_to_head(db_url)
    store = await Store.open(db_url)
    try:
        assert await store.lexical_search(["麻糬"], "pell", 1, 5) == [1]
        await store.delete_user_data(2)
        assert await store.resolve_user("console", "carl", "carl") == 3
    finally:
        await store.close()


async def test_the_shared_rate_limit_counts_the_last_minute_by_index(db_url: str) -> None:
    """The per-viewer limit shared across processes counts a viewer's last minute through
    (user_id, created_at), not by reading everything the viewer ever said."""
    from datetime import datetime

    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    from memory.store.statements import RECENT_ADMITTED

    await migrate.upgrade_to_head(db_url)
    engine = create_async_engine(db_url)
    try:
        async with engine.connect() as conn:
            statement = RECENT_ADMITTED.params(user_id=1, platform="twitch",
                                               since=datetime(2026, 12, 7, 12, 0))
            compiled = str(statement.compile(dialect=conn.dialect,
                                             compile_kwargs={"literal_binds": True}))
            if conn.dialect.name == "sqlite":
                plan = " ".join(str(row[-1]) for row in await conn.exec_driver_sql(
                    f"EXPLAIN QUERY PLAN {compiled}"))
            else:
                await conn.execute(text("SET enable_seqscan = off"))
                plan = " ".join(str(row[0]) for row in await conn.exec_driver_sql(
                    f"EXPLAIN {compiled}"))
    finally:
        await engine.dispose()
    assert "ix_messages_user_created" in plan, plan


async def test_a_completion_written_again_lands_once(store: Store) -> None:
    """A completion whose commit was not known (the database went away at COMMIT) is written
    again from the spool: the reply is stored once and the state rule applied once."""
    user = await store.resolve_user("console", "viewer", "viewer")
    question = await _exchange(store, user, "hi", "hello")
    reply_id, state = await store.complete_exchange(
        user_message_id=question, reply_text="hello", trace={"k": 1},
        platform_message_id=None, default_mood="calm", rule=bump_intimacy, created_at=NOW)
    replies = [m for m in await messages_for(store, user) if m.role == "assistant"]
    assert [m.id for m in replies] == [reply_id]
    assert state.intimacy == 1 and state.version == 1
    assert (await get_state(store, user, "pell", "calm")).intimacy == 1


def test_a_pooled_postgresql_connection_is_checked_in_one_round_trip() -> None:
    """At checkout, one simple-protocol query (not BEGIN, ``;``, ROLLBACK: three); a
    connection that fails it is discarded (the pool takes another, as after a server
    restart: ``test_a_database_restart_leaves_the_role_held``)."""
    import asyncio

    from sqlalchemy import exc
    from sqlalchemy.util import greenlet_spawn

    from memory.store.pg_ping import ping

    class Driver:
        def __init__(self, alive: bool) -> None:
            self.alive, self.sent = alive, []

        async def execute(self, query: str) -> str:
            self.sent.append(query)
            if not self.alive:
                raise ConnectionResetError("the server closed the connection")
            return "SELECT 1"

    live, dead = Driver(True), Driver(False)

    async def check(driver: Driver) -> None:
        await greenlet_spawn(ping, type("Adapted", (), {"_connection": driver})(), None, None)

    asyncio.run(check(live))
    assert live.sent == ["SELECT 1"]
    with pytest.raises(exc.DisconnectionError):
        asyncio.run(check(dead))


def test_an_adapter_without_the_drivers_connection_is_checked_by_its_own_ping() -> None:
    """Should SQLAlchemy's asyncpg adapter stop exposing ``_connection``, the check falls
    back to the adapter's own ping instead of discarding every connection."""
    from memory.store.pg_ping import ping

    class Adapter:
        pinged = 0

        def ping(self) -> None:
            self.pinged += 1

    adapter = Adapter()
    ping(adapter, None, None)
    assert adapter.pinged == 1
