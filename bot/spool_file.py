"""The spool on disk: what the store could not take, kept in a file of JSON lines in the data
dir, so a process killed during a store outage still knows at its restart what it told the
viewers (their final states), and never answers the same message again."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from datetime import datetime
from pathlib import Path
from typing import Any

from memory.store import IntakeItem

log = logging.getLogger(__name__)

StatusChange = tuple[int, str, str | None]


class SpoolFile:
    """Appends each spooled write (flushed and synced: it is written only while the store is
    away, when it is the one record), rewrites the file once the store took them, and reads
    it back at start-up. A file that cannot be written (a full disk) leaves the spool in
    memory only, said once in the log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failing = False

    def append_intake(self, item: IntakeItem) -> None:
        entry = dataclasses.asdict(item)
        entry["created_at"] = item.created_at.isoformat()
        self._append({"intake": entry})

    def append_status(self, change: StatusChange) -> None:
        self._append({"status": list(change)})

    def rewrite(self, intake: list[IntakeItem], statuses: list[StatusChange]) -> None:
        """What is still spooled, and nothing else (no file when nothing is)."""
        try:
            self.path.unlink(missing_ok=True)
        except OSError as exc:
            self._failed(exc)
            return
        for item in intake:
            self.append_intake(item)
        for change in statuses:
            self.append_status(change)

    def read(self) -> tuple[list[IntakeItem], list[StatusChange]]:
        """What an earlier run spooled and never wrote; a damaged line (the run died while
        writing it) is skipped."""
        intake: list[IntakeItem] = []
        statuses: list[StatusChange] = []
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return intake, statuses
        for line in lines:
            try:
                entry = json.loads(line)
                if "intake" in entry:
                    fields = entry["intake"]
                    fields["created_at"] = datetime.fromisoformat(fields["created_at"])
                    intake.append(IntakeItem(**fields))
                else:
                    message_id, status, reason = entry["status"]
                    statuses.append((int(message_id), str(status), reason))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("spool file %s: skipping a damaged line (%s)", self.path, exc)
        return intake, statuses

    def _append(self, entry: dict[str, Any]) -> None:
        try:
            with self.path.open("a", encoding="utf-8") as handle:
                handle.write(json.dumps(entry, ensure_ascii=False) + "\n")
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            self._failed(exc)
            return
        self._failing = False

    def _failed(self, exc: OSError) -> None:
        if not self._failing:
            self._failing = True
            log.error("spool file %s cannot be written (%s): a crash before the store is back "
                      "would lose what is spooled", self.path, exc.strerror or exc)
