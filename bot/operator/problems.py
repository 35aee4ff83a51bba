"""The dashboard's error feed: the last warnings and errors the runtime logged, the same one
counted rather than repeated (a store outage logs the same line for every message), secrets
masked as in the log itself."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

from engine.secret_scan import SecretMask

PROBLEMS_KEPT = 50


@dataclass(slots=True)
class Problem:
    level: str
    logger: str
    message: str  # the latest of its kind, masked
    count: int
    first_at: str
    last_at: str


class RecentProblems(logging.Handler):
    """Kept per (logger, message template): a line that repeats with other values (a
    message id, a count) is one problem counted, its latest wording shown."""

    def __init__(self, secrets: Iterable[str], kept: int = PROBLEMS_KEPT) -> None:
        super().__init__(level=logging.WARNING)
        self._mask = SecretMask(secrets)
        self._kept = kept
        self._problems: OrderedDict[tuple[str, str], Problem] = OrderedDict()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = self._mask(record.getMessage())[:500]
        except Exception:  # noqa: BLE001 - a log call's bad arguments must not break logging
            self.handleError(record)
            return
        now = datetime.fromtimestamp(record.created, UTC).isoformat()
        key = (record.name, str(record.msg))
        problem = self._problems.pop(key, None)
        if problem is None:
            problem = Problem(record.levelname, record.name, message, 0, now, now)
        problem.count += 1
        problem.message, problem.last_at, problem.level = message, now, record.levelname
        self._problems[key] = problem  # the newest last
        while len(self._problems) > self._kept:
            self._problems.popitem(last=False)

    def newest_first(self) -> list[dict[str, Any]]:
        # Under the handler's lock: other threads (the decode loop, say) log meanwhile.
        with self.lock:  # type: ignore[union-attr]
            return [asdict(problem) for problem in reversed(self._problems.values())]
