"""One runtime per data dir: two ``run``s on one SQLite file would both answer every message.
An advisory lock (``flock``) on ``<data dir>/vtuber.lock``, released by the OS when the process
ends however it ends (kill -9 included), so a stale lock file never blocks a restart."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from bot.errors import BotError

try:
    import fcntl
except ImportError:  # Windows: no flock; the lock is skipped there
    fcntl = None  # type: ignore[assignment]

EXIT_TEMPFAIL = 75  # BSD EX_TEMPFAIL: try again once the other process has stopped


class AlreadyRunningError(BotError):
    exit_code = EXIT_TEMPFAIL


@contextlib.contextmanager
def instance_lock(data_dir: Path) -> Iterator[None]:
    """Hold the data dir's lock for the ``with`` block, or raise ``AlreadyRunningError``
    naming the process that holds it."""
    if fcntl is None:
        yield
        return
    path = data_dir / "vtuber.lock"
    handle = path.open("a+", encoding="utf-8")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise AlreadyRunningError(
                f"another vtuber-bot (pid {holder}) is already running on data dir "
                f"{data_dir}; stop it first, or give this one its own --data-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        handle.close()  # closing the file releases the lock
