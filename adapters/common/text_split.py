"""Split a reply into platform-sized messages, preferring sentence ends (full-width too)."""

from __future__ import annotations

import re

_BREAKS = re.compile(r"(?<=[。！？!?～…\n])|(?<=[.;:])\s")


def split_message(text: str, limit: int) -> list[str]:
    """Pieces of at most ``limit`` characters, cut after a sentence end where possible,
    else at a space, else hard."""
    if limit <= 0:
        raise ValueError("limit must be positive")
    pieces: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[:limit]
        cut = max((m.end() for m in _BREAKS.finditer(window) if m.end() > limit // 3),
                  default=0)
        if not cut:
            cut = window.rfind(" ") + 1 if " " in window[limit // 3:] else limit
        pieces.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        pieces.append(rest)
    return [p for p in pieces if p]
