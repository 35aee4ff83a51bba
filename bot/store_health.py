"""The store's health as the operator sees it: one ERROR line when it goes, one INFO line
when it is back (not one per failed message), and a flag for ``/readyz`` and ``/metrics``."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from memory.errors import StoreError

log = logging.getLogger(__name__)


class StoreHealth:
    """Tells the operator once when the store goes away and once when it is back."""

    def __init__(self) -> None:
        self.ok = True

    def failed(self, exc: BaseException) -> None:
        if self.ok:
            self.ok = False
            log.error("store unavailable: %s (replies go on; failures are logged per message)",
                      exc)

    def succeeded(self) -> None:
        if not self.ok:
            self.ok = True
            log.info("store is reachable again")

    def heard(self, write: asyncio.Future[Any]) -> None:
        """A done-callback for a write nobody awaits at once: how it ended counts."""
        if write.cancelled():
            return
        error = write.exception()
        if error is None:
            self.succeeded()
        elif isinstance(error, StoreError):
            self.failed(error)
