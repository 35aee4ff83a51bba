"""One-time codes that link a viewer's accounts across platforms (``/link`` on Discord, then
``!link CODE`` on Twitch).

A code is 8 symbols of a 32-letter alphabet (40 bits), single-use, valid for 10 minutes.
Guessing is bounded twice: each viewer gets ``PER_VIEWER_ATTEMPTS`` tries and everyone together
``GLOBAL_ATTEMPTS`` per ``ATTEMPT_WINDOW_S``. With at most ``MAX_OPEN_CODES`` codes open, one
window of guessing succeeds with probability at most
GLOBAL_ATTEMPTS x MAX_OPEN_CODES / 2**40 = 200 x 1000 / 1.1e12 ≈ 1.8e-7.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from bot.flow import SlidingWindowLimiter

ALPHABET = "ABCDEFGHJKLMNPQRSTUVWXYZ23456789"  # 32 symbols, no 0/O, 1/I
CODE_LENGTH = 8  # 8 x 5 bits = 40 bits
CODE_TTL_S = 600.0
ATTEMPT_WINDOW_S = 600.0
PER_VIEWER_ATTEMPTS = 5
GLOBAL_ATTEMPTS = 200
MAX_OPEN_CODES = 1000


@dataclass(frozen=True, slots=True)
class LinkRequest:
    platform: str
    platform_user_id: str
    expires_at: float


class LinkCodes:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._open: dict[str, LinkRequest] = {}
        self._per_viewer = SlidingWindowLimiter(PER_VIEWER_ATTEMPTS, ATTEMPT_WINDOW_S)
        self._everyone = SlidingWindowLimiter(GLOBAL_ATTEMPTS, ATTEMPT_WINDOW_S)

    def create(self, platform: str, platform_user_id: str) -> str:
        """A fresh code for this viewer (their earlier open code stops working)."""
        now = self._clock()
        self._open = {code: request for code, request in self._open.items()
                      if request.expires_at > now
                      and (request.platform, request.platform_user_id)
                      != (platform, platform_user_id)}
        while len(self._open) >= MAX_OPEN_CODES:  # the oldest make room
            self._open.pop(next(iter(self._open)))
        code = "".join(secrets.choice(ALPHABET) for _ in range(CODE_LENGTH))
        self._open[code] = LinkRequest(platform, platform_user_id, now + CODE_TTL_S)
        return code

    def redeem(self, code: str, platform: str, platform_user_id: str) -> LinkRequest | None:
        """The request behind ``code`` (used up), or None: unknown, expired, from the same
        platform, or the caller is out of attempts."""
        now = self._clock()
        if not (self._per_viewer.allow(f"{platform}:{platform_user_id}", now)
                and self._everyone.allow("all", now)):
            return None
        request = self._open.get(code.strip().upper().replace(" ", ""))
        if request is None or request.expires_at < now or request.platform == platform:
            return None
        del self._open[code.strip().upper().replace(" ", "")]
        return request
