"""Twitch chat over an EventSub conduit, for several processes: the conduit has
``shard_count`` shards, Twitch spreads the channel's events over the enabled ones, and each
process holds some of them (a websocket each). The subscriptions belong to the conduit, not to
a session, so a process that stops loses nothing: its shards go disabled and Twitch sends their
share to the others until it is back."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import twitchio

from bot.adapter_config import TwitchAdapterConfig
from bot.errors import ConfigError

log = logging.getLogger(__name__)
# Between two looks for the conduit, while the process holding shard 0 creates it.
CONDUIT_POLL_S = 1.0


async def resolve_conduit(client: twitchio.Client, rules: TwitchAdapterConfig) -> str:
    """The id of the conduit the shards share: the configured one, else the one this client
    id has, created (or resized to ``shard_count``) by the process holding shard 0; the
    others wait up to ``conduit_wait_s`` for it."""
    if rules.conduit_id:
        return rules.conduit_id
    assert rules.shard_ids is not None and rules.shard_count is not None
    owner = 0 in rules.shard_ids
    deadline = asyncio.get_running_loop().time() + rules.conduit_wait_s
    while True:
        conduits = await client.fetch_conduits()
        if len(conduits) > 1:
            raise ConfigError([
                f"adapters.twitch.conduit_id: this client id has {len(conduits)} conduits "
                f"({', '.join(c.id for c in conduits)}); set the one the shards share"])
        if conduits:
            conduit = conduits[0]
            if owner and conduit.shard_count != rules.shard_count:
                log.info("resizing Twitch conduit %s to %d shards", conduit.id,
                         rules.shard_count)
                await conduit.update(rules.shard_count)
            return conduit.id
        if owner:
            created = await client.create_conduit(rules.shard_count)
            log.info("created Twitch conduit %s with %d shards", created.id, rules.shard_count)
            return created.id
        if asyncio.get_running_loop().time() >= deadline:
            raise ConfigError([
                f"adapters.twitch: no conduit appeared within {rules.conduit_wait_s:.0f} s; "
                "start the process holding shard 0 (it creates it) or set conduit_id"])
        await asyncio.sleep(CONDUIT_POLL_S)


async def subscribe_conduit(client: Any, subscriptions: list[Any]) -> None:
    """Subscribe the conduit to ``subscriptions`` (``twitchio.AutoClient``): each process
    does, as one that starts alone must; those that exist already (409) are fine."""
    result = await client.multi_subscribe(subscriptions)
    failed = [error for error in result.errors if error.error.status != 409]
    for error in failed:
        log.error("Twitch refused the subscription %s: %s", error.subscription.type,
                  error.error)
