"""Text at the edge: what no store or platform should ever get."""

from __future__ import annotations

import re

# NUL (PostgreSQL refuses it in text) and lone UTF-16 surrogates (not encodable as UTF-8);
# in a Python str every surrogate code point is a lone one.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def storable(text: str) -> str:
    return _UNSTORABLE.sub("", text)
