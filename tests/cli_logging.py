"""For tests that call ``bot.cli.main`` in-process (to reach a local server or patch a
library): ``main`` configures the root logger for a whole process."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def root_logging_restored() -> Iterator[None]:
    """Give the test session its own root logger back after ``main`` ran."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        yield
    finally:
        root.handlers[:], level = saved
        root.setLevel(level)
