"""Text at the edge: what no store or platform should ever get."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from bot.events import ChatEvent

import logging
import re

log = logging.getLogger(__name__)

# Longer than any platform sends (Discord 4,000 with Nitro, Twitch 500); a longer message is
# cut here, before anything reads it (a 10 MB one held the event loop for seconds), and the
# stored text ends with TRUNCATED so the cut is visible.
MAX_MESSAGE_CHARS = 8000
TRUNCATED = " […]"
# NUL (PostgreSQL refuses it in text) and lone UTF-16 surrogates (not encodable as UTF-8);
# in a Python str every surrogate code point is a lone one.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    return _UNSTORABLE.sub("", text)


def sanitized(event: ChatEvent) -> ChatEvent:
    """At most ``MAX_MESSAGE_CHARS`` of text; no NUL and no lone surrogates in anything that
    reaches the store."""
    if len(event.text) > MAX_MESSAGE_CHARS:
        log.warning("message %s from %s:%s cut from %d to %d characters", event.message_id,
                    event.platform, event.platform_user_id, len(event.text), MAX_MESSAGE_CHARS)
        event = dataclasses.replace(event, text=event.text[:MAX_MESSAGE_CHARS] + TRUNCATED)
    fields = (event.text, event.display_name, event.platform_user_id, event.channel_id,
              event.message_id or "")
    if not any(_UNSTORABLE.search(value) for value in fields):
        return event  # the usual case: no copy (a flood's every message passes here)
    return dataclasses.replace(
        event, text=storable(event.text), display_name=storable(event.display_name),
        platform_user_id=storable(event.platform_user_id),
        channel_id=storable(event.channel_id),
        message_id=storable(event.message_id) if event.message_id is not None else None)
