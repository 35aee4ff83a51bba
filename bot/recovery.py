"""Crash recovery's policy: which messages an earlier run left ``received`` are this
process's to answer now, which end ``expired(crash)``, and which are left to others."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
from datetime import datetime, timedelta
from pathlib import Path

from bot.config import AppConfig, LimitsConfig
from memory.errors import StoreError
from memory.store import Leftover, Store
from memory.store.roles import RoleLostError

log = logging.getLogger(__name__)


async def sort_out_leftovers(store: Store, limits: LimitsConfig, now: datetime,
                             role: str | None) -> tuple[int, list[Leftover]]:
    """Expire what is too old to answer; return how many ended so, and the leftovers to
    answer (younger than ``limits.answer_leftovers_within_s``).

    A SQLite file has one process, so every such row is ours. PostgreSQL may be shared: the
    rows this process's ``role`` took are ours (it holds the role now, so nobody else is
    answering them); other rows younger than twice the reply timeout may be in flight in
    another process and are left alone, and rows other roles took are theirs to recover."""
    fresh_since = now - timedelta(seconds=limits.answer_leftovers_within_s)
    in_flight_since = (None if store.dialect == "sqlite"
                       else now - timedelta(seconds=2 * limits.reply_timeout_s))
    expire_before = min(fresh_since, in_flight_since or fresh_since)
    expired = await store.expire_received("crash", before=expire_before)
    if role is not None and in_flight_since is not None:
        expired += await store.expire_received("crash", before=fresh_since, owner=role)
    if not limits.answer_leftovers_within_s:
        return expired, []
    return expired, await store.leftovers(fresh_since, before=in_flight_since, owner=role)


def runtime_role(config: AppConfig, adapters: list[str], data_dir: Path) -> str:
    """The work this process does, as a role name: its platforms, with the shards it runs
    ("discord[0,1/4]+twitch[0/2]"). A console chat is the terminal's own (one per data
    dir)."""
    parts = []
    for name in sorted(adapters):
        section = getattr(config.adapters, name)
        if name in ("discord", "twitch") and section.shard_ids is not None:
            name = f"{name}[{','.join(map(str, section.shard_ids))}/{section.shard_count}]"
        elif name == "console":
            name = "console@" + hashlib.sha256(str(data_dir).encode()).hexdigest()[:16]
        parts.append(name)
    return "+".join(parts)


def instance_owner(data_dir: Path) -> str:
    """Who holds a role's lease: this host and data dir, the same after a restart (so the
    same instance, restarted, takes its lease back at once; two processes never share a data
    dir, a file lock sees to that)."""
    return f"{socket.gethostname()}:{hashlib.sha256(str(data_dir).encode()).hexdigest()[:12]}"


def roles_overlap(role: str, other: str) -> bool:
    """Whether two roles share work: a platform in both, unsharded in either, sharded by
    different counts, or with a shard in common."""
    mine, theirs = _platform_shards(role), _platform_shards(other)
    for platform, shards in mine.items():
        if platform not in theirs:
            continue
        other_shards = theirs[platform]
        if shards is None or other_shards is None or shards[1] != other_shards[1]:
            return True
        if shards[0] & other_shards[0]:
            return True
    return False


def _platform_shards(role: str) -> dict[str, tuple[frozenset[int], int] | None]:
    """``discord[0,1/4]+twitch`` -> {discord: ({0, 1}, 4), twitch: None}."""
    parts: dict[str, tuple[frozenset[int], int] | None] = {}
    for part in role.split("+"):
        name, _, spec = part.partition("[")
        if not spec:
            parts[name] = None
            continue
        ids, _, count = spec.rstrip("]").partition("/")
        parts[name] = (frozenset(int(i) for i in ids.split(",") if i), int(count))
    return parts


async def keep_lease(store: Store, lease_s: float) -> None:
    """Renew this process's role every third of the lease until cancelled. While the database
    is away the lease holds until it expires, and renewing goes on; ``RoleLostError`` (it
    expired and another process holds the role now) ends the run."""
    while True:
        await asyncio.sleep(lease_s / 3)
        try:
            await store.renew_role()
        except RoleLostError:
            raise
        except StoreError as exc:
            log.warning("the role's lease could not be renewed (it holds %.0f s from the "
                        "last renewal): %s", lease_s, exc)
