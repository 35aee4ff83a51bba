"""A batch limit lowered by running out of memory comes back: one bad moment (a burst of
long prompts) must not halve it for good. I/O-free."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class LimitRecovery:
    """Counts units of work (decode steps, micro-batches) since memory last ran out; after
    ``after`` of them a lowered limit doubles, never above the configured one.

    Invariant: the limit returned is between the one given and ``ceiling``."""

    def __init__(self, after: int) -> None:
        self._after = after
        self._calm = 0

    def ran_out(self) -> None:
        self._calm = 0

    def next_limit(self, current: int, ceiling: int) -> int:
        """The limit after one more unit of work done without running out of memory."""
        self._calm += 1
        if self._calm < self._after or current >= ceiling:
            return current
        self._calm = 0
        grown = min(ceiling, 2 * current)
        log.info("no memory trouble lately; batch limit back to %d", grown)
        return grown
