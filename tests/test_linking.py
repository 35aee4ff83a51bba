"""Link codes: 40 bits, single use, expiring, and brute force bounded per viewer and overall."""

from __future__ import annotations

import math

from bot.linking import (
    ALPHABET,
    CODE_LENGTH,
    CODE_TTL_S,
    GLOBAL_ATTEMPTS,
    MAX_OPEN_CODES,
    PER_VIEWER_ATTEMPTS,
    LinkCodes,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_codes_carry_at_least_40_bits_and_work_once() -> None:
    assert CODE_LENGTH * math.log2(len(set(ALPHABET))) >= 40
    codes = LinkCodes()
    code = codes.create("discord", "ann")
    assert len(code) == CODE_LENGTH and set(code) <= set(ALPHABET)
    request = codes.redeem(code.lower(), "twitch", "ann_tv")
    assert request is not None and (request.platform, request.platform_user_id) == (
        "discord", "ann")
    assert codes.redeem(code, "twitch", "ann_tv") is None  # used up


def test_codes_expire_and_do_not_work_on_their_own_platform() -> None:
    clock = Clock()
    codes = LinkCodes(clock)
    code = codes.create("discord", "ann")
    assert codes.redeem(code, "discord", "someone") is None
    clock.now += CODE_TTL_S + 1
    assert codes.redeem(code, "twitch", "ann_tv") is None


def test_brute_force_is_refused_after_the_limits() -> None:
    clock = Clock()
    codes = LinkCodes(clock)
    real = codes.create("discord", "victim")
    for _ in range(PER_VIEWER_ATTEMPTS):
        assert codes.redeem("AAAAAAAA", "twitch", "attacker") is None
    # Out of attempts: even the right code is refused for this viewer now.
    assert codes.redeem(real, "twitch", "attacker") is None
    # Many accounts together hit the global limit.
    for index in range(GLOBAL_ATTEMPTS):
        codes.redeem("BBBBBBBB", "twitch", f"sock-{index}")
    assert codes.redeem(real, "twitch", "honest") is None
    # The chance one window of guessing hits any open code.
    assert GLOBAL_ATTEMPTS * MAX_OPEN_CODES / 2**40 < 1e-6
