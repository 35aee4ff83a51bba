"""ReplySink over a Discord channel: 2000-character pieces split on sentence ends, every send
with ``AllowedMentions.none()`` so model text can never ping @everyone, a role or a user.
Discord's HTTP errors leave as ``DeliveryError``: retryable only where discord.py did not retry
already (one place owns the retries of a route)."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import discord

from adapters.common.pieces import PiecesSent
from adapters.common.text_split import split_message
from bot.events import DeliveryError

# discord.py's HTTP client retries these itself (5 tries, honouring Retry-After on a 429):
# one that reaches us has had its retries, and ours on top would multiply them.
RETRIED_BY_DISCORD_PY = frozenset({429, 500, 502, 504, 524})


@asynccontextmanager
async def delivery_errors() -> AsyncIterator[None]:
    try:
        yield
    except discord.HTTPException as exc:
        retryable = exc.status >= 500 and exc.status not in RETRIED_BY_DISCORD_PY
        raise DeliveryError(f"Discord answered {exc.status}: {exc.text or exc}",
                            retryable=retryable,
                            retry_after=getattr(exc, "retry_after", None)) from exc


DISCORD_LIMIT = 2000
NO_PINGS = discord.AllowedMentions.none()


class ChannelEdits:
    """Edits under way per channel, across the replies there (one per adapter): Discord
    limits edits per channel, and discord.py holds an edit while its bucket is empty."""

    def __init__(self) -> None:
        self._under_way: Counter[int] = Counter()

    @asynccontextmanager
    async def editing(self, channel_id: int) -> AsyncIterator[None]:
        self._under_way[channel_id] += 1
        try:
            yield
        finally:
            self._under_way[channel_id] -= 1

    def any(self, channel_id: int) -> bool:
        return self._under_way[channel_id] > 0


class DiscordSink:
    supports_edits = True
    idempotent_sends = True  # each piece carries a nonce Discord enforces

    def __init__(self, channel: Any,
                 reply_to: discord.Message | discord.MessageReference | None = None,
                 edits: ChannelEdits | None = None) -> None:
        self._channel = channel
        self._edits = edits or ChannelEdits()
        self._reply_to = reply_to
        self._sent: dict[str, discord.Message] = {}
        # A streamed reply over 2,000 characters: the messages holding its overflow, so each
        # edit updates them in place instead of posting the overflow again.
        self._overflow: dict[str, list[discord.Message]] = {}
        self._pieces = PiecesSent(DISCORD_LIMIT)

    async def send(self, text: str) -> str | None:
        async with delivery_errors():
            return await self._send(text)

    async def _send(self, text: str) -> str | None:
        for piece in self._pieces.still_to_send(text):
            kwargs: dict[str, Any] = {"allowed_mentions": NO_PINGS}
            if not self._pieces.ids and self._reply_to is not None:  # the first piece
                kwargs["reference"] = self._reply_to
                kwargs["mention_author"] = False
            nonce = self._nonce(len(self._pieces.ids))
            if nonce is not None:
                kwargs["nonce"] = nonce
            message = await self._channel.send(piece, **kwargs)
            self._sent[str(message.id)] = message
            self._pieces.sent(str(message.id))
        return self._pieces.first()

    def _nonce(self, piece: int) -> str | None:
        """The same for a question's piece in every process and every try. discord.py sends
        it with ``enforce_nonce``, so Discord hands back the message it already created with
        it (for a few minutes) instead of posting again: a reply sent again after a crash, by
        the process that adopts the question or by the one restarted, is posted once."""
        reference = self._reply_to
        question = (getattr(reference, "message_id", None) or getattr(reference, "id", None)
                    if reference is not None else None)
        return f"{question}.{piece}" if question is not None else None

    async def edit(self, message_id: str, text: str) -> None:
        """Replace a streamed message; text past 2,000 characters goes out as new messages."""
        message = self._sent.get(message_id)
        if message is None:
            return
        first, *rest = split_message(text, DISCORD_LIMIT) or [""]
        overflow = self._overflow.setdefault(message_id, [])
        async with delivery_errors(), self._edits.editing(self._channel.id):
            if message.content != first:
                edited = await message.edit(content=first, allowed_mentions=NO_PINGS)
                self._sent[message_id] = edited or message
            for index, piece in enumerate(rest):
                if index < len(overflow):
                    if overflow[index].content != piece:
                        edited = await overflow[index].edit(content=piece,
                                                            allowed_mentions=NO_PINGS)
                        overflow[index] = edited or overflow[index]
                else:
                    overflow.append(await self._channel.send(piece,
                                                             allowed_mentions=NO_PINGS))

    def previews_paused(self) -> bool:
        """While an edit in this channel waits, a preview would only queue behind it (and the
        final texts behind the previews): previews pause; final texts never do."""
        return self._edits.any(self._channel.id)

    async def typing(self) -> None:
        # One typing notice (lasts ~10 s); the reply itself ends it.
        await self._channel.typing()  # awaited once: a single typing notice
