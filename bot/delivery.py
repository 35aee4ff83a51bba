"""Getting a reply to the viewer: the final send retried on 429/5xx with backoff; typing and
preview edits are cosmetic and never decide a reply's fate."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from bot.config import LimitsConfig
from bot.events import ChatEvent, DeliveryError

log = logging.getLogger(__name__)

SEND_ATTEMPTS = 3
BACKOFF_S = (0.5, 2.0)
MAX_RETRY_AFTER_S = 10.0


class DeliveryFailed(Exception):
    """The final send failed for good (after retries, or refused outright)."""


def _retryable(exc: Exception) -> tuple[bool, float | None]:
    if isinstance(exc, DeliveryError):
        return exc.retryable, exc.retry_after
    return isinstance(exc, OSError | TimeoutError), None


async def deliver(send: Callable[[], Awaitable[str | None]], what: str,
                  *, sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> str | None:
    """Run ``send`` until it succeeds, retrying transient failures; raise DeliveryFailed."""
    for attempt in range(SEND_ATTEMPTS):
        try:
            return await send()
        except Exception as exc:  # the sink is the platform's edge: anything may come out
            retryable, retry_after = _retryable(exc)
            if not retryable or attempt == SEND_ATTEMPTS - 1:
                raise DeliveryFailed(f"{what}: {type(exc).__name__}: {exc}") from exc
            delay = min(retry_after or BACKOFF_S[attempt], MAX_RETRY_AFTER_S)
            log.info("%s failed (%s), retrying in %.1f s", what, exc, delay)
            await sleep(delay)
    raise AssertionError("unreachable")


async def cosmetic(call: Awaitable[None], what: str) -> bool:
    """A call whose failure only costs looks (typing, a preview edit): logged, never raised."""
    try:
        await call
    except Exception as exc:  # noqa: BLE001 - cosmetic by contract: nothing may fail a reply
        log.debug("%s failed: %s: %s", what, type(exc).__name__, exc)
        return False
    return True


def send_backlog(event: ChatEvent) -> float:
    """Seconds the platform's send limit has spoken for in this channel (Twitch's 20 in
    30 s), from sinks that know; 0 otherwise."""
    backlog = getattr(event.sink, "send_backlog_s", None)
    return float(backlog()) if backlog is not None else 0.0


def backlog_limit(limits: LimitsConfig) -> float:
    """A reply may wait this long for its channel's send limit: half its timeout (the rest
    is for generating it), and never past the point where it would be stale. Waiting longer
    would end in a timeout, and its fallback would wait in the same line."""
    limit = limits.reply_timeout_s / 2
    return min(limit, limits.stale_after_s) if limits.stale_after_s else limit
