"""The SQLite WAL stays bounded while readers never stop: passive checkpoints alone never
rewind a WAL that some reader is always using."""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from pathlib import Path

from memory.store.checkpoint import Checkpointer

LIMIT = 256 * 1024


def _open(path: Path) -> sqlite3.Connection:
    connection = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA wal_autocheckpoint=0")  # as the store sets it
    connection.execute("PRAGMA busy_timeout=10000")
    return connection


def _overlapping_readers(path: Path, stop: threading.Event) -> None:
    """Two readers taking turns, so one is always inside a read transaction."""
    readers = [_open(path), _open(path)]
    readers[0].execute("BEGIN")
    readers[0].execute("SELECT count(*) FROM t").fetchall()
    turn = 0
    while not stop.is_set():
        other = readers[1 - turn]
        other.execute("BEGIN")
        other.execute("SELECT count(*) FROM t").fetchall()
        readers[turn].execute("COMMIT")
        turn = 1 - turn
    readers[turn].execute("COMMIT")
    for reader in readers:
        reader.close()


def test_the_wal_is_truncated_while_readers_never_stop(tmp_path: Path) -> None:
    path = tmp_path / "db.sqlite"
    writer = _open(path)
    writer.execute("CREATE TABLE t (b BLOB)")
    stop = threading.Event()
    readers = threading.Thread(target=_overlapping_readers, args=(path, stop))
    readers.start()
    checkpointer = Checkpointer(str(path), every_s=0.01, truncate_above=LIMIT)
    try:
        for _ in range(400):  # 6 MiB written, far more than the limit
            writer.execute("INSERT INTO t VALUES (randomblob(16384))")
        deadline = time.monotonic() + 60
        while os.path.getsize(f"{path}-wal") > LIMIT and time.monotonic() < deadline:
            time.sleep(0.01)  # waits for the checkpointer; 60 s only bounds a failure
        assert os.path.getsize(f"{path}-wal") <= LIMIT
    finally:
        stop.set()
        readers.join()
        checkpointer.close()
        writer.close()
    assert sqlite3.connect(path).execute("SELECT count(*) FROM t").fetchone() == (400,)
