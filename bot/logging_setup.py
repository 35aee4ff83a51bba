"""Logging for the CLI: one concise line per record on stderr (stdout is for replies), with
every configured secret masked: in messages, arguments and tracebacks alike."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable

MASK = "***"
MIN_SECRET_LENGTH = 4  # shorter values would mask ordinary words


class MaskingFormatter(logging.Formatter):
    """Formats a record, then removes every secret from the whole text (traceback included:
    a library's exception may quote a token or a URL with a password)."""

    def __init__(self, secrets: Iterable[str], fmt: str, datefmt: str) -> None:
        super().__init__(fmt, datefmt)
        self._secrets = sorted({s for s in secrets if len(s) >= MIN_SECRET_LENGTH},
                               key=len, reverse=True)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        for secret in self._secrets:
            text = text.replace(secret, MASK)
        return text

# Libraries whose INFO output is noise for an operator.
_QUIET = ("transformers", "huggingface_hub", "urllib3", "httpx", "asyncio", "aiosqlite",
          "sqlalchemy", "alembic", "filelock", "accelerate")


def configure_logging(level: str = "INFO", secrets: Iterable[str] = ()) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(MaskingFormatter(
        secrets, "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
