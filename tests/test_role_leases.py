"""Roles on a shared PostgreSQL are held by leases, not session locks: a database restart
leaves the holder holding (and a second process for the role refused), a holder that stops
renewing loses the role when its lease expires, the same instance restarted takes its lease
back at once, and roles that share shards are refused; the connection pool is the size the
config says. Every window is set here."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest

from bot.recovery import keep_lease, roles_overlap
from memory.store import Store
from memory.store.roles import RoleLostError, RoleTakenError

LEASE_S = 2.0


@pytest.fixture
async def url(own_postgres: Any) -> AsyncIterator[str]:
    yield own_postgres.create_database("leases")


async def _expired(store: Store, role: str) -> None:
    """Wait (on the database's clock) until ``role``'s lease has run out."""
    async with store.database.read() as session:
        from sqlalchemy import text

        left = await session.scalar(text(
            "SELECT EXTRACT(EPOCH FROM expires_at - now()) FROM role_leases WHERE role = :r"),
            {"r": role})
    await asyncio.sleep(max(0.0, float(left or 0)) + 0.2)


@pytest.mark.parametrize(("role", "other", "shared"), [
    ("discord[0,1/2]", "discord[1/2]", True), ("discord[0/2]", "discord[1/2]", False),
    ("discord", "discord[1/2]", True), ("discord[0/2]", "discord[0/4]", True),
    ("discord[0/2]+twitch", "twitch", True), ("discord[0/2]", "twitch", False),
])
def test_roles_that_share_work_overlap(role: str, other: str, shared: bool) -> None:
    assert roles_overlap(role, other) is shared and roles_overlap(other, role) is shared


async def test_a_database_restart_leaves_the_role_held(own_postgres: Any, url: str) -> None:
    first = await Store.open(url)
    second = await Store.open(url)
    try:
        await first.take_role("discord[0/2]", "host-a", LEASE_S)
        own_postgres.stop()
        own_postgres.resume()
        await first.renew_role()  # a new connection; the lease is a row, still its own
        with pytest.raises(RoleTakenError, match=r"already runs discord\[0/2\]"):
            await second.take_role("discord[0/2]", "host-b", LEASE_S)
    finally:
        await first.close()
        await second.close()


async def test_an_expired_lease_is_taken_over_and_its_old_holder_stops(url: str) -> None:
    stalled = await Store.open(url)
    taker = await Store.open(url)
    try:
        await stalled.take_role("twitch", "host-a", LEASE_S)
        with pytest.raises(RoleTakenError):
            await taker.take_role("twitch", "host-b", LEASE_S)
        await _expired(stalled, "twitch")  # host-a stopped renewing (cut off, frozen)
        await taker.take_role("twitch", "host-b", LEASE_S)
        with pytest.raises(RoleLostError, match="another process runs it now"):
            await stalled.renew_role()
        with pytest.raises(RoleLostError):
            await keep_lease(stalled, 0.03)  # the run's watcher ends the run with it
    finally:
        await stalled.close()
        await taker.close()


async def test_the_same_instance_restarted_takes_its_lease_back_at_once(url: str) -> None:
    before = await Store.open(url)
    await before.take_role("discord", "host-a:data", LEASE_S)
    await before.database.close()  # killed: no release, the lease still runs
    after = await Store.open(url)
    try:
        await after.take_role("discord", "host-a:data", LEASE_S)
    finally:
        await after.close()


async def test_overlapping_shards_are_refused_in_one_line(url: str) -> None:
    first = await Store.open(url)
    second = await Store.open(url)
    try:
        await first.take_role("discord[0,1/2]", "host-a", LEASE_S)
        with pytest.raises(RoleTakenError) as refused:
            await second.take_role("discord[1/2]", "host-b", LEASE_S,
                                   lambda other: roles_overlap("discord[1/2]", other))
        await second.take_role("twitch", "host-b", LEASE_S,
                               lambda other: roles_overlap("twitch", other))
    finally:
        await first.close()
        await second.close()
    assert "overlaps discord[0,1/2]" in str(refused.value) and "\n" not in str(refused.value)


async def test_the_pool_is_the_size_the_config_says(url: str) -> None:
    store = await Store.open(url, pool_size=3, pool_timeout_s=5)
    try:
        pool = store.database.sql_engine.pool
        assert pool.size() == 3  # type: ignore[attr-defined]
    finally:
        await store.close()
