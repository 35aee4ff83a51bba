"""Chinese script conversion with the official OpenCC binding, protecting configured terms."""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

log = logging.getLogger(__name__)

MODES = ("s2twp", "s2tw", "s2hk", "s2t", "off")
# Private-use code points: OpenCC leaves them alone, so protected terms survive byte for byte.
_PLACEHOLDER_BASE = 0xF0000


@lru_cache(maxsize=8)
def _converter(mode: str) -> Any:
    import opencc

    return opencc.OpenCC(f"{mode}.json")


def convert(text: str, mode: str, protected: tuple[str, ...] = ()) -> str:
    """Convert ``text`` to the script of ``mode``; ``protected`` terms are left untouched."""
    if mode == "off" or not text:
        return text
    if mode not in MODES:
        raise ValueError(f"unknown Chinese conversion mode {mode!r}; allowed: {', '.join(MODES)}")
    shielded, originals = _shield(text, protected)
    converter = _converter(mode)
    converted: str = converter.convert(shielded)
    # OpenCC's phrase tables are not idempotent ("云" → "云" → "雲" once a neighbour changed):
    # convert to a fixed point so nothing in a reply would still change.
    for _ in range(3):
        again = converter.convert(converted)
        if again == converted:
            break
        converted = again
    for index, term in enumerate(originals):
        converted = converted.replace(chr(_PLACEHOLDER_BASE + index), term)
    return converted


def _shield(text: str, protected: tuple[str, ...]) -> tuple[str, list[str]]:
    originals: list[str] = []
    for term in sorted({t for t in protected if t}, key=len, reverse=True):
        if term in text:
            text = text.replace(term, chr(_PLACEHOLDER_BASE + len(originals)))
            originals.append(term)
    return text, originals


@lru_cache(maxsize=256)
def fold_script(text: str) -> str:
    """``text`` in Simplified characters: one script to compare texts in, whatever script
    each was written in (cached: the prompts compared against repeat)."""
    return str(_converter("t2s").convert(text)) if text else text
