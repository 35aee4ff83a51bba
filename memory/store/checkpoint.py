"""The SQLite WAL copied back into the database file from a thread of its own."""

from __future__ import annotations

import logging
import sqlite3
import threading

CHECKPOINT_EVERY_S = 1.0
log = logging.getLogger(__name__)


class Checkpointer:
    """Every ``every_s``, a passive checkpoint from a thread of its own: the WAL stays small
    (a nearly full disk recovers once space returns), and no writer waits for it. A passive
    checkpoint never blocks readers or writers; a failed one (a full disk) is retried on the
    next tick."""

    def __init__(self, path: str, every_s: float = CHECKPOINT_EVERY_S) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(path, every_s),
                                        name="store-checkpoint", daemon=True)
        self._thread.start()

    def _run(self, path: str, every_s: float) -> None:
        try:
            connection = sqlite3.connect(path)
        except sqlite3.Error as exc:
            log.warning("store: no WAL checkpoints (%s); the WAL may grow", exc)
            return
        try:
            while not self._stop.wait(every_s):
                try:
                    connection.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
                except sqlite3.Error as exc:
                    log.debug("store: WAL checkpoint failed, retrying: %s", exc)
        finally:
            connection.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
