"""The SQLite WAL copied back into the database file from a thread of its own, and kept small."""

from __future__ import annotations

import logging
import os
import sqlite3
import threading

CHECKPOINT_EVERY_S = 1.0
# Above this the WAL is truncated. Passive checkpoints copy the WAL back but never rewind it
# while some reader is always using it (a busy show), so alone they let it grow without end.
TRUNCATE_ABOVE_BYTES = 4 * 1024 * 1024
# How long a truncating checkpoint waits for readers; writers queue behind it meanwhile.
TRUNCATE_WAIT_MS = 200
log = logging.getLogger(__name__)


class Checkpointer:
    """Every ``every_s``, from a thread of its own: a passive checkpoint (never blocks anyone),
    and when the WAL has grown past ``truncate_above`` bytes a truncating one, which waits up
    to ``TRUNCATE_WAIT_MS`` for readers to move off the WAL and then empties the file. No
    writer commits a checkpoint itself; a failed one (a full disk, readers that stayed) is
    tried again on the next tick, so a nearly full disk recovers once space returns."""

    def __init__(self, path: str, every_s: float = CHECKPOINT_EVERY_S,
                 truncate_above: int = TRUNCATE_ABOVE_BYTES) -> None:
        self._wal = f"{path}-wal"
        self._truncate_above = truncate_above
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path, every_s),
                                        name="store-checkpoint", daemon=True)
        self._thread.start()

    def _run(self, path: str, every_s: float) -> None:
        try:
            connection = sqlite3.connect(path)
            connection.execute(f"PRAGMA busy_timeout={TRUNCATE_WAIT_MS}")
        except sqlite3.Error as exc:
            log.warning("store: no WAL checkpoints (%s); the WAL may grow", exc)
            return
        try:
            while not self._stop.wait(every_s):
                try:
                    connection.execute(f"PRAGMA wal_checkpoint({self._mode()})").fetchall()
                except sqlite3.Error as exc:
                    log.debug("store: WAL checkpoint failed, retrying: %s", exc)
        finally:
            connection.close()

    def _mode(self) -> str:
        try:
            grown = os.path.getsize(self._wal) > self._truncate_above
        except OSError:  # no WAL yet
            grown = False
        return "TRUNCATE" if grown else "PASSIVE"

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
