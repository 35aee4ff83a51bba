"""Logging for the CLI: one concise line per record on stderr (stdout is for replies)."""

from __future__ import annotations

import logging
import sys

# Libraries whose INFO output is noise for an operator.
_QUIET = ("transformers", "huggingface_hub", "urllib3", "httpx", "asyncio", "aiosqlite",
          "sqlalchemy", "alembic", "filelock", "accelerate")


def configure_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s",
                                           "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
