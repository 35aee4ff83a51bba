"""Link codes: 40 bits, single use, expiring, surviving a restart, and brute force bounded per
viewer and overall; on SQLite and PostgreSQL."""

from __future__ import annotations

import math
from typing import Any

from bot.linking import (
    ALPHABET,
    ATTEMPT_WINDOW_S,
    CODE_LENGTH,
    CODE_TTL_S,
    GLOBAL_ATTEMPTS,
    MAX_OPEN_CODES,
    PER_VIEWER_ATTEMPTS,
    LinkCodes,
)
from memory.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_codes_carry_at_least_40_bits_and_work_once(store: Any) -> None:
    assert CODE_LENGTH * math.log2(len(set(ALPHABET))) >= 40
    codes = LinkCodes(store)
    code = await codes.create("discord", "ann")
    assert len(code) == CODE_LENGTH and set(code) <= set(ALPHABET)
    request = await codes.redeem(code.lower(), "twitch", "ann_tv")
    assert request is not None and (request.platform, request.platform_user_id) == (
        "discord", "ann")
    assert await codes.redeem(code, "twitch", "ann_tv") is None  # used up


async def test_codes_expire_and_do_not_work_on_their_own_platform(store: Any) -> None:
    clock = Clock()
    codes = LinkCodes(store, clock)
    code = await codes.create("discord", "ann")
    assert await codes.redeem(code, "discord", "someone") is None
    clock.now += CODE_TTL_S + 1
    assert await codes.redeem(code, "twitch", "ann_tv") is None


async def test_a_new_code_replaces_the_viewers_earlier_one(store: Any) -> None:
    codes = LinkCodes(store)
    first = await codes.create("discord", "ann")
    second = await codes.create("discord", "ann")
    assert await codes.redeem(first, "twitch", "ann_tv") is None
    assert await codes.redeem(second, "twitch", "ann_tv") is not None


async def test_a_code_survives_a_restart(db_url: str) -> None:
    first = await Store.open(db_url)
    try:
        code = await LinkCodes(first).create("discord", "ann")
    finally:
        await first.close()
    again = await Store.open(db_url)  # a new process, as far as the code can tell
    try:
        request = await LinkCodes(again).redeem(code, "twitch", "ann_tv")
    finally:
        await again.close()
    assert request is not None and request.platform_user_id == "ann"


async def test_forgetting_a_viewer_removes_their_open_code(store: Any) -> None:
    codes = LinkCodes(store)
    user_id = await store.resolve_user("discord", "ann", "Ann")
    code = await codes.create("discord", "ann")
    await store.delete_user_data(user_id)
    assert await codes.redeem(code, "twitch", "ann_tv") is None


async def test_brute_force_is_refused_after_the_limits(store: Any) -> None:
    codes = LinkCodes(store, Clock())
    real = await codes.create("discord", "victim")
    for _ in range(PER_VIEWER_ATTEMPTS):
        assert await codes.redeem("AAAAAAAA", "twitch", "attacker") is None
    # Out of attempts: even the right code is refused for this viewer now.
    assert await codes.redeem(real, "twitch", "attacker") is None
    # Many accounts together use up the window's wrong guesses: from then on each account
    # gets one try, so the socks are refused and a viewer typing their own code is not.
    for index in range(GLOBAL_ATTEMPTS // 2):
        for _ in range(2):
            await codes.redeem("BBBBBBBB", "twitch", f"sock-{index}")
    assert await codes.redeem(real, "twitch", "sock-0") is None
    assert await codes.redeem(real, "twitch", "honest") is not None
    # The chance one window of guessing hits any open code, from 100,000 accounts.
    assert (GLOBAL_ATTEMPTS + 100_000) * MAX_OPEN_CODES / 2**40 < 1e-4


async def test_the_guessing_limits_hold_across_processes(db_url: str) -> None:
    """Two processes on one database share a viewer's tries: spreading guesses over them
    buys nothing; a window later the viewer may try again."""
    clock = Clock()
    first, second = await Store.open(db_url), await Store.open(db_url)
    try:
        here, there = LinkCodes(first, clock), LinkCodes(second, clock)
        real = await here.create("discord", "victim")
        for attempt in range(PER_VIEWER_ATTEMPTS):
            codes = here if attempt % 2 else there
            assert await codes.redeem("AAAAAAAA", "twitch", "attacker") is None
        assert await here.redeem(real, "twitch", "attacker") is None
        assert await there.redeem(real, "twitch", "attacker") is None
        clock.now += ATTEMPT_WINDOW_S + 1
        fresh = await here.create("discord", "victim")  # the first one expired meanwhile
        assert await there.redeem(fresh, "twitch", "attacker") is not None
    finally:
        await first.close()
        await second.close()
