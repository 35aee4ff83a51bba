"""One-time codes that link a viewer's accounts across platforms (``/link`` on Discord, then
``!link CODE`` on Twitch).

A code is 8 symbols of a 32-letter alphabet (40 bits), single-use, valid for 10 minutes, kept
in the database as a hash: it survives a restart and works in whichever process the viewer's
``!link`` reaches. Guessing is bounded twice, the tries counted in the database so every
process shares the limits: each viewer gets
``PER_VIEWER_ATTEMPTS`` tries per ``ATTEMPT_WINDOW_S``, and once everyone together has
guessed wrong ``GLOBAL_ATTEMPTS`` times in a window, only a viewer's first try of the window
goes through: a flood of wrong guesses from many accounts cannot lock out a viewer typing
their own code. With at most ``MAX_OPEN_CODES`` codes open, one window of guessing from A
accounts succeeds with probability at most
(GLOBAL_ATTEMPTS + A) x MAX_OPEN_CODES / 2**40: 1.8e-7 with a few accounts, 9e-5 with 100,000.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from memory.store import Store

ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # 32 symbols, no 0/O, 1/I
CODE_LENGTH = 8  # 8 x 5 bits = 40 bits
CODE_TTL_S = 600.0
ATTEMPT_WINDOW_S = 600.0
PER_VIEWER_ATTEMPTS = 5
GLOBAL_ATTEMPTS = 200
MAX_OPEN_CODES = 1000


@dataclass(frozen=True, slots=True)
class LinkRequest:
    """Who opened a code (the account the redeeming one is linked to)."""

    platform: str
    platform_user_id: str


def _hash(code: str) -> str:
    return hashlib.sha256(code.strip().upper().replace(" ", "").encode()).hexdigest()


class LinkCodes:
    def __init__(self, store: Store, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock

    def _moment(self, offset_s: float = 0.0) -> datetime:
        return datetime.fromtimestamp(self._clock() + offset_s, UTC)

    async def create(self, platform: str, platform_user_id: str) -> str:
        """A fresh code for this viewer (their earlier open code stops working)."""
        code = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
        await self._store.open_link_code(
            _hash(code), platform, platform_user_id, now=self._moment(),
            expires_at=self._moment(CODE_TTL_S), max_open=MAX_OPEN_CODES)
        return code

    async def redeem(self, code: str, platform: str,
                     platform_user_id: str) -> LinkRequest | None:
        """Who opened ``code`` (which is used up), or None: unknown, expired, opened on this
        same platform, or the caller is out of attempts."""
        viewer = f"{platform}:{platform_user_id}"
        now, since = self._moment(), self._moment(-ATTEMPT_WINDOW_S)
        mine, wrong = await self._store.link_attempts(viewer, since)
        if mine >= PER_VIEWER_ATTEMPTS:
            return None
        guessed = wrong < GLOBAL_ATTEMPTS or mine == 0  # past a flood: first tries only
        taken = None
        if guessed:
            taken = await self._store.take_link_code(_hash(code), now=now,
                                                     redeeming_platform=platform)
        await self._store.record_link_attempt(viewer, wrong=guessed and taken is None,
                                              now=now, forget_before=since)
        return LinkRequest(*taken) if taken is not None else None
