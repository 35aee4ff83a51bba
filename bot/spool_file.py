"""The spool on disk: what the store could not take, kept in a file of JSON lines in the data
dir, so a process killed during a store outage still knows at its restart what it told the
viewers (their final states), and never answers the same message again."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
from datetime import datetime
from pathlib import Path

from memory.store import IntakeItem

log = logging.getLogger(__name__)

StatusChange = tuple[int, str, str | None]


class SpoolFile:
    """Appends each spooled write (synced: it is written only while the store is away, when
    it is the one record), rewrites the file once the store took them, and reads it back at
    start-up. Within an event loop the writing happens on a worker thread, in order, what
    queued meanwhile in one go: a flood during an outage must not wait on the disk. A file
    that cannot be written (a full disk) leaves the spool in memory only, said once in the
    log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._failing = False
        self._queued: list[tuple[bool, list[str]]] = []  # (replace the file first?, lines)
        self._writer: asyncio.Task[None] | None = None

    def append_intake(self, item: IntakeItem) -> None:
        self._queue(False, [_intake_line(item)])

    def append_status(self, change: StatusChange) -> None:
        self._queue(False, [_status_line(change)])

    def rewrite(self, intake: list[IntakeItem], statuses: list[StatusChange]) -> None:
        """What is still spooled, and nothing else (no file when nothing is)."""
        self._queue(True, [*map(_intake_line, intake), *map(_status_line, statuses)])

    async def settled(self) -> None:
        """Until everything queued is on disk (shutdown)."""
        while self._writer is not None and not self._writer.done():
            await self._writer

    def _queue(self, replace: bool, lines: list[str]) -> None:
        self._queued.append((replace, lines))
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no event loop (tools, tests): at once
            self._write(self._take())
            return
        if self._writer is None or self._writer.done():
            self._writer = loop.create_task(self._drain(), name="spool-file")

    def _take(self) -> list[tuple[bool, list[str]]]:
        queued, self._queued = self._queued, []
        return queued

    async def _drain(self) -> None:
        while self._queued:
            await asyncio.to_thread(self._write, self._take())

    def _write(self, queued: list[tuple[bool, list[str]]]) -> None:
        """Apply ``queued`` in order: from the last rewrite on, nothing before it counts."""
        last = max((i for i, (replace, _) in enumerate(queued) if replace), default=None)
        lines = [line for _, batch in queued[last or 0:] for line in batch]
        try:
            if last is not None:
                self.path.unlink(missing_ok=True)
            if lines:
                with self.path.open("a", encoding="utf-8") as handle:
                    handle.writelines(lines)
                    handle.flush()
                    os.fsync(handle.fileno())
        except OSError as exc:
            self._failed(exc)
            return
        self._failing = False

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

    def _failed(self, exc: OSError) -> None:
        if not self._failing:
            self._failing = True
            log.error("spool file %s cannot be written (%s): a crash before the store is back "
                      "would lose what is spooled", self.path, exc.strerror or exc)


def _intake_line(item: IntakeItem) -> str:
    entry = dataclasses.asdict(item)
    entry["created_at"] = item.created_at.isoformat()
    return json.dumps({"intake": entry}, ensure_ascii=False) + "\n"


def _status_line(change: StatusChange) -> str:
    return json.dumps({"status": list(change)}) + "\n"
