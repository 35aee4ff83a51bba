"""A reply sent as several platform messages, resumed where a failed send stopped."""

from __future__ import annotations

from adapters.common.text_split import split_message


class PiecesSent:
    """Which pieces of a reply already went out. ``deliver`` retries a whole ``send(text)``
    after a 429 or 5xx; without this, a failure on the second piece posted the first again.
    A retry of the same text gets only the pieces still to send; another text starts anew.

    Invariant: ``ids`` holds the platform ids of a prefix of ``pieces(text)``, in order."""

    def __init__(self, limit: int) -> None:
        self._limit = limit
        self._text: str | None = None
        self.ids: list[str] = []

    def still_to_send(self, text: str) -> list[str]:
        """The pieces of ``text`` not sent yet (all of them unless this is a retry)."""
        if text != self._text:
            self._text, self.ids = text, []
        return split_message(text, self._limit)[len(self.ids):]

    def sent(self, message_id: str) -> None:
        self.ids.append(message_id)

    def first(self) -> str | None:
        """The first piece's id once all went out; the next text starts afresh."""
        self._text = None
        return self.ids[0] if self.ids else None
