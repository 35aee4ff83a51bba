"""Streaming previews: a reply shown while it is generated, on platforms that can edit.

Previews are cosmetic: a failed preview send or edit stops the previews (logged at debug) and
never fails the reply; the final text then goes out as a normal, retried send. A preview runs
beside the chunks, one at a time: a platform that holds an edit for its rate limit gets the
next preview only once that one is through, never a queue of them."""

from __future__ import annotations

import asyncio
import logging

from bot.delivery import DeliveryFailed, cosmetic, deliver
from bot.events import ReplySink

log = logging.getLogger(__name__)

# How often the text is looked at while no preview goes out (no finished sentence yet, or the
# same text): the output stage reruns over the whole reply, so not once per token.
LOOK_EVERY_S = 0.1


class StreamingPreview:
    """Shows a reply while it is generated: the first text early, then at most one edit per
    ``interval`` seconds (platform rate limits), then the final text. The caller computes
    the text (the output stage, once for every consumer) when ``due`` says a preview would go
    out, and hands it to ``show``."""

    def __init__(self, sink: ReplySink, interval: float) -> None:
        self._sink = sink
        self._interval = interval
        self._last = 0.0
        self._looked = 0.0
        self._shown = ""
        self._broken = False
        self._showing: asyncio.Task[None] | None = None
        self.message_id: str | None = None

    def due(self, now: float) -> bool:
        """Whether a preview would go out now: the interval has passed, the last one is
        through, and the platform is not asking for a pause."""
        busy = self._showing is not None and not self._showing.done()
        return not (self._broken or busy or now - self._last < self._interval
                    or now - self._looked < min(LOOK_EVERY_S, self._interval)
                    or self._paused())

    def show(self, text: str, now: float) -> None:
        """Start showing ``text`` beside the reply (if it is new)."""
        self._looked = now
        if not text or text == self._shown:
            return
        self._last = now
        self._showing = asyncio.create_task(self._show_cosmetic(text))

    def _paused(self) -> bool:
        """The platform asks for no preview now (its edit budget is in use elsewhere)."""
        paused = getattr(self._sink, "previews_paused", None)
        return bool(paused()) if paused is not None else False

    async def _show_cosmetic(self, text: str) -> None:
        self._broken = not await cosmetic(self._show(text), "preview")
        if not self._broken:
            self._shown = text

    async def _show(self, text: str) -> None:
        if self.message_id is None:
            self.message_id = await self._sink.send(text)
        else:
            await self._sink.edit(self.message_id, text)

    def abandon(self) -> None:
        """The reply failed (a timeout, say): a preview still under way is called off, so
        nothing of it lands after the fallback."""
        if self._showing is not None:
            self._showing.cancel()

    async def finish(self, final: str) -> str | None:
        """Deliver the final text (retried); return the platform id of the message. A preview
        still going is let through first: the final text must be the last edit, and a first
        send in flight holds the id of the message to edit."""
        if self._showing is not None:
            await self._showing
        shown_id = self.message_id
        if shown_id is not None and not self._broken:
            if final == self._shown:
                return shown_id

            async def edit() -> str | None:
                await self._sink.edit(shown_id, final)
                return shown_id

            try:
                return await deliver(edit, "final edit")
            except DeliveryFailed as exc:
                log.debug("final edit failed (%s); sending the reply anew", exc)
        return await deliver(lambda: self._sink.send(final), "send")


def supports_edits(sink: ReplySink) -> bool:
    return bool(getattr(sink, "supports_edits", False))
