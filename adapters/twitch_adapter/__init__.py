"""Twitch adapter (twitchio 3, EventSub ``channel.chat.message``). Install the ``twitch`` extra."""

from adapters.twitch_adapter.adapter import TwitchAdapter

__all__ = ["TwitchAdapter"]
