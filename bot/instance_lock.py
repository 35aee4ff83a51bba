"""One runtime per data dir, and one per SQLite store: two ``run``s on one SQLite file would
both answer every message. Advisory locks (``flock``) on ``<data dir>/vtuber.lock`` and
``<database>.runtime-lock``, released by the OS when the process ends however it ends (kill -9
included), so a stale lock file never blocks a restart."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

from bot.errors import BotError
from bot.paths import EXIT_CANTCREAT

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock is skipped there
    fcntl = None  # type: ignore[assignment]

EXIT_TEMPFAIL = 75  # BSD EX_TEMPFAIL: try again once the other process has stopped


class AlreadyRunningError(BotError):
    exit_code = EXIT_TEMPFAIL


class LockFileError(BotError):
    """The lock file cannot be opened (a missing or read-only directory)."""

    exit_code = EXIT_CANTCREAT


@contextlib.contextmanager
def instance_lock(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's lock for the ``with`` block, or raise ``AlreadyRunningError``
    naming the process that holds it."""
    with _exclusive(data_dir / "vtuber.lock", lambda holder: (
            f"another vtuber-bot (pid {holder}) is already running on data dir {data_dir}; "
            "stop it first, or give this one its own --data-dir")):
        yield


@contextlib.contextmanager
def sqlite_store_lock(database: Path) -> Iterator[None]:
    """One runtime per SQLite file, whatever its data dir: SQLite serialises writers within a
    process only, so several processes need PostgreSQL."""
    with _exclusive(database.with_name(database.name + ".runtime-lock"), lambda holder: (
            f"another vtuber-bot (pid {holder}) is running on the SQLite store {database}; "
            "one process per SQLite store: several processes need PostgreSQL "
            "(store.url or VTUBER_DATABASE_URL: postgresql+asyncpg://...)")):
        yield


@contextlib.contextmanager
def _exclusive(path: Path, conflict: Callable[[str], str]) -> Iterator[None]:
    if fcntl is None:
        yield
        return
    try:
        handle = path.open("a+", encoding="utf-8")
    except OSError as exc:
        raise LockFileError(f"cannot open the lock file {path}: {exc.strerror or exc}; "
                            "check that the directory exists and is writable") from None
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            raise AlreadyRunningError(conflict(handle.read().strip() or "unknown")) from None
        _note_holder(handle)
        yield
    finally:
        with contextlib.suppress(OSError):  # a full disk may refuse the pid's last flush
            handle.close()  # closing the file releases the lock


def _note_holder(handle: TextIO) -> None:
    """Our pid in the lock file, for the message a second process shows. Only a hint: on a
    full disk it is left out and the lock (held by the OS) still holds."""
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
    except OSError:
        with contextlib.suppress(OSError):
            handle.truncate(0)
