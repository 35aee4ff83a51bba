"""Drills a live show goes through: the process killed with SIGKILL mid-chat, on SQLite and on
PostgreSQL. Nothing committed is lost, nothing stays ``received`` after the restart, and every
answered question has its reply (the exchange is one unit of work)."""

from __future__ import annotations

import asyncio
import os
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from bot.config import load_config
from bot.paths import DataPaths
from bot.runtime import open_runtime
from tests.sinks import RecordingSink
from tests.store_reads import messages_for

REPLY = "收到囉"


def _write_config(tmp_path: Path, db_url: str) -> Path:
    path = tmp_path / "drill.yaml"
    path.write_text(yaml.safe_dump({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": [REPLY]}},
                   "embedding": {"enabled": False}},
        "store": {"url": db_url, "remember_messages_min_chars": 0},
        # PostgreSQL may be shared by several processes, so start-up only expires rows older
        # than twice the reply timeout; a short one keeps the drill short.
        # The console cannot answer what a killed run left (its terminal went with it), so
        # every leftover must end expired (crash) at the restart.
        "limits": {"user_messages_per_minute": 100_000, "max_pending": 10_000,
                   "reply_timeout_s": 1, "answer_leftovers_within_s": 0},
    }, allow_unicode=True), encoding="utf-8")
    return path


def _pump(stream: Any, lines: queue.Queue[str]) -> None:
    for line in iter(stream.readline, ""):
        lines.put(line)


def _chat_under_load(config: Path, data_dir: Path, rate: float, kill_after: int) -> list[str]:
    """Feed ``vtuber-bot chat`` at ``rate`` msg/s; SIGKILL it after ``kill_after`` messages;
    return what it printed."""
    process = subprocess.Popen(
        [sys.executable, "-m", "bot", "--config", str(config), "--data-dir", str(data_dir),
         "--log-level", "ERROR", "chat", "--user", "viewer"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert process.stdin is not None and process.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(process.stdout, lines), daemon=True).start()
    printed: list[str] = []
    deadline = time.monotonic() + 60
    while not any("/quit" in line for line in printed):  # the help line: the REPL is up
        assert time.monotonic() < deadline, "the REPL did not start"
        printed.append(lines.get(timeout=60))
    try:
        for i in range(kill_after):
            process.stdin.write(f"message {i}\n")
            process.stdin.flush()
            time.sleep(1 / rate)
        process.kill()  # SIGKILL: no handler, no finally, no flush
        process.wait(timeout=10)
    finally:
        if process.poll() is None:
            process.kill()
    while not lines.empty():
        printed.append(lines.get_nowait())
    return printed


async def _after_restart(config: Path, data_dir: Path) -> dict[str, Any]:
    app_config = load_config(config, env={})
    async with open_runtime(app_config, DataPaths.resolve(data_dir)) as runtime:
        user_id = await runtime.store.find_user("console", "viewer")
        assert user_id is not None
        rows = await messages_for(runtime.store, user_id)
        integrity = None
        if runtime.store.dialect == "sqlite":
            from sqlalchemy import text

            async with runtime.store.database.read() as session:
                integrity = (await session.execute(text("PRAGMA integrity_check"))).scalar()
    questions = [r for r in rows if r.role == "user"]
    answers = [r.reply_to_id for r in rows if r.role == "assistant"]
    replies = set(answers)
    duplicates = sorted({a for a in answers if answers.count(a) > 1})
    return {"questions": questions, "replies": replies, "integrity": integrity,
            "duplicates": duplicates}


def test_kill_9_under_load_loses_nothing_committed(db_url: str, tmp_path: Path) -> None:
    config = _write_config(tmp_path, db_url)
    data_dir = tmp_path / "data"
    printed = _chat_under_load(config, data_dir, rate=50, kill_after=100)
    shown = sum(line.count(REPLY) for line in printed)
    assert shown > 10, "the drill needs a running chat to kill"
    time.sleep(2.5)  # past 2 x reply_timeout_s: nothing of the killed run can be in flight
    state = asyncio.run(_after_restart(config, data_dir))
    questions = state["questions"]
    assert [q for q in questions if q.status == "received"] == []
    answered = [q for q in questions if q.status == "answered"]
    # Each answered question has its reply, and a reply is recorded right after it is shown,
    # so at most the one being recorded at the kill is missing.
    assert all(q.id in state["replies"] for q in answered)
    assert len(answered) >= shown - 1
    assert {q.status_reason for q in questions if q.status == "expired"} <= {"crash"}
    assert state["integrity"] in (None, "ok")


async def test_postgres_outage_mid_run_ends_every_message_final(own_postgres: Any,
                                                                tmp_path: Path) -> None:
    from bot.config import parse_config
    from bot.events import ChatEvent

    url = own_postgres.create_database("outage")
    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": [REPLY]}},
                   "embedding": {"enabled": False}},
        "store": {"url": url, "remember_messages_min_chars": 0},
        "limits": {"user_messages_per_minute": 100_000, "max_pending": 10_000},
    }, env={})
    sink = RecordingSink()
    offered = 0

    async def offer(seconds: float) -> list[Any]:
        nonlocal offered
        replies = []
        end = asyncio.get_running_loop().time() + seconds
        while asyncio.get_running_loop().time() < end:
            offered += 1
            replies.append(await runtime.service.handle(ChatEvent(
                platform="twitch", channel_id="c", platform_user_id=f"v{offered % 7}",
                display_name="v", text=f"hello {offered}", sink=sink,
                message_id=f"m{offered}")))
            await asyncio.sleep(0.05)
        return replies

    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        before = await offer(1.0)
        await asyncio.to_thread(own_postgres.stop)  # pg_ctl stop -m immediate
        during = await offer(5.0)
        await asyncio.to_thread(own_postgres.resume)
        after = await offer(1.5)
        await runtime.service.flush(spool_timeout_s=10)
        assert runtime.service.spooled == 0
        counts: dict[str, int] = {}
        for i in range(7):
            user_id = await runtime.store.find_user("twitch", f"v{i}")
            assert user_id is not None
            for row in await messages_for(runtime.store, user_id):
                if row.role == "user":
                    counts[row.status] = counts.get(row.status, 0) + 1
    replies = before + during + after
    assert all(r.status in ("answered", "failed", "dropped") for r in replies)
    assert any(r.status == "failed" and r.reason == "store" for r in during)
    assert after[-1].status == "answered"
    assert sum(counts.values()) == offered  # none missing
    assert "received" not in counts  # none stuck
    assert len(sink.sent) == offered  # each viewer got the reply or one fallback


@pytest.fixture
def small_disk(tmp_path: Path) -> Any:
    """A 2 MiB file system of our own (tmpfs), where root may mount one."""
    import contextlib
    import shutil

    mount_point = tmp_path / "small-disk"
    mount_point.mkdir()
    if shutil.which("mount") is None or subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount_point)],
            capture_output=True, check=False).returncode != 0:
        pytest.skip("cannot mount a small tmpfs here (needs root)")
    try:
        yield mount_point
    finally:
        with contextlib.suppress(OSError):
            subprocess.run(["umount", "-l", str(mount_point)], check=False,
                           capture_output=True)


def _fill(folder: Path, leave_bytes: int) -> Path:
    filler = folder / "filler"
    free = os.statvfs(folder).f_bavail * os.statvfs(folder).f_frsize
    with filler.open("wb") as handle:
        handle.write(b"\0" * max(0, free - leave_bytes))
    return filler


async def test_full_disk_fails_cleanly_and_recovers(small_disk: Path,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    from bot.config import parse_config
    from bot.events import ChatEvent

    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": [REPLY]}},
                   "embedding": {"enabled": False}},
        "store": {"remember_messages_min_chars": 0, "rag_enabled": False},
        "limits": {"user_messages_per_minute": 100_000},
    }, env={})
    sink = RecordingSink()

    def said(index: int) -> ChatEvent:
        return ChatEvent(platform="twitch", channel_id="c", platform_user_id="ann",
                         display_name="Ann", text=f"hello {index} " + "x" * 400, sink=sink,
                         message_id=f"m{index}")

    async with open_runtime(config, DataPaths.resolve(small_disk / "data")) as runtime:
        before = [await runtime.service.handle(said(i)) for i in range(5)]
        assert {r.status for r in before} == {"answered"}
        filler = _fill(small_disk, leave_bytes=0)
        during = [await runtime.service.handle(said(i)) for i in range(5, 40)]
        assert any(r.status == "failed" and r.reason == "store" for r in during)
        assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no traceback
        filler.unlink()  # space returns
        after = await runtime.service.handle(said(40))
        assert after.status == "answered"
        await runtime.service.flush(spool_timeout_s=10)
        assert runtime.service.spooled == 0
        user_id = await runtime.store.find_user("twitch", "ann")
        assert user_id is not None
        rows = [m for m in await messages_for(runtime.store, user_id) if m.role == "user"]
        from sqlalchemy import text

        async with runtime.store.database.read() as session:
            integrity = (await session.execute(text("PRAGMA integrity_check"))).scalar()
    assert integrity == "ok"
    assert len(rows) == 41 and "received" not in {r.status for r in rows}
    assert len(sink.sent) == 41  # the reply or one fallback each


async def test_a_database_locked_by_another_process_ends_every_message_final(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Another process holds SQLite's write lock longer than ``busy_timeout_ms``: each message
    ends final (answered, or the store fallback), nothing is logged as a traceback, and what
    was spooled is written once the lock goes."""
    import sqlite3

    from bot.config import parse_config
    from bot.events import ChatEvent

    config = parse_config({
        "models": {"llm": {"backend": "scripted", "scripted": {"replies": [REPLY]}},
                   "embedding": {"enabled": False}},
        "store": {"remember_messages_min_chars": 0, "busy_timeout_ms": 50},
        "limits": {"user_messages_per_minute": 100_000},
    }, env={})
    sink = RecordingSink()

    def said(index: int) -> ChatEvent:
        return ChatEvent(platform="twitch", channel_id="c", platform_user_id=f"v{index % 3}",
                         display_name="v", text=f"hello {index}", sink=sink,
                         message_id=f"m{index}")

    paths = DataPaths.resolve(tmp_path)
    async with open_runtime(config, paths) as runtime:
        before = [await runtime.service.handle(said(i)) for i in range(3)]
        other = sqlite3.connect(paths.sqlite_file, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the other process's write lock, held
        try:
            during = [await runtime.service.handle(said(i)) for i in range(3, 12)]
            assert not runtime.service.store_health.ok
        finally:
            other.execute("ROLLBACK")
            other.close()
        after = await runtime.service.handle(said(12))
        await runtime.service.flush(spool_timeout_s=10)
        assert runtime.service.spooled == 0
        statuses = []
        for viewer in range(3):
            user_id = await runtime.store.find_user("twitch", f"v{viewer}")
            assert user_id is not None
            statuses += [m.status for m in await messages_for(runtime.store, user_id)
                         if m.role == "user"]
    assert {r.status for r in before} == {"answered"} and after.status == "answered"
    assert all(r.status in ("answered", "failed") for r in during)
    assert any(r.status == "failed" and r.reason == "store" for r in during)
    assert [r.getMessage() for r in caplog.records if r.exc_info] == []  # no traceback
    assert len(statuses) == 13 and "received" not in statuses
    assert len(sink.sent) == 13  # the reply or one fallback each


def test_the_instance_lock_holds_on_a_full_disk(small_disk: Path) -> None:
    """The pid in the lock file is only a hint: a full disk must not turn `chat --once` into
    a traceback before the store can say what is wrong."""
    from bot.instance_lock import AlreadyRunningError, instance_lock

    data_dir = small_disk / "data"
    data_dir.mkdir()
    _fill(small_disk, leave_bytes=0)
    held = instance_lock(data_dir)
    with held, pytest.raises(AlreadyRunningError), instance_lock(data_dir):
        pass


async def test_a_run_that_dies_during_an_outage_never_answers_those_messages_again(
        own_postgres: Any, tmp_path: Path) -> None:
    """PostgreSQL goes away while replies are being generated: they go out, their final
    states cannot be written and are spooled, and the run ends before the store is back (the
    spool on disk is all that remains). The next run writes them first, so none of those
    messages is a leftover to answer again."""
    from bot.config import parse_config
    from bot.events import ChatEvent
    from tests.fake_openai import FakeOpenAI

    server = FakeOpenAI()
    await server.start()
    url = own_postgres.create_database("crash_mid_outage")
    config = parse_config({
        "models": {"llm": {"backend": "openai", "openai": {"base_url": server.base_url}},
                   "embedding": {"enabled": False}},
        "store": {"url": url, "remember_messages_min_chars": 0},
        "limits": {"user_messages_per_minute": 100_000, "answer_leftovers_within_s": 3600},
    }, env={})
    sink = RecordingSink()
    paths = DataPaths.resolve(tmp_path)
    try:
        async with open_runtime(config, paths, role="console") as runtime:
            server.hold(lambda _body: True)
            asked = [asyncio.create_task(runtime.service.handle(ChatEvent(
                platform="console", channel_id="c", platform_user_id=f"v{i}",
                display_name="v", text=f"hello {i}", sink=sink, message_id=f"m{i}")))
                for i in range(5)]
            await server.wait_until(lambda: sum(m == "POST" for m, _p, _b in server.calls) == 5)
            await asyncio.to_thread(own_postgres.stop)  # recorded `received`, then gone
            server.release()
            await asyncio.gather(*asked)
        assert len(sink.sent) == 5 and paths.spool_file.exists()
        await asyncio.to_thread(own_postgres.resume)
        async with open_runtime(config, paths, role="console") as runtime:
            leftovers = list(runtime.service.leftovers)
            statuses = [m.status for i in range(5)
                        for m in await messages_for(runtime.store,
                            await runtime.store.find_user("console", f"v{i}") or 0)
                        if m.role == "user"]
    finally:
        await server.stop()
    assert leftovers == []  # nobody is spoken to twice about the same message
    assert len(statuses) == 5 and "received" not in statuses
    assert not paths.spool_file.exists()
