"""Logging for the CLI: one concise line per record on stderr (stdout is for replies), or one
JSON object per line for log collectors (``logging.format: json``), with every configured
secret masked: in messages, arguments and tracebacks alike."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterable
from datetime import UTC, datetime

from engine.secret_scan import SecretMask


class MaskingFormatter(logging.Formatter):
    """Formats a record, then removes every secret from the whole text (traceback included:
    a library's exception may quote a token or a URL with a password)."""

    def __init__(self, secrets: Iterable[str], fmt: str, datefmt: str) -> None:
        super().__init__(fmt, datefmt)
        self._mask = SecretMask(secrets)

    def format(self, record: logging.LogRecord) -> str:
        return self._mask(super().format(record))


class JsonFormatter(MaskingFormatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, and the
    traceback when there is one; secrets masked in all of them."""

    def __init__(self, secrets: Iterable[str]) -> None:
        super().__init__(secrets, "%(message)s", "%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": datetime.fromtimestamp(record.created, UTC).isoformat(),
                 "level": record.levelname, "logger": record.name,
                 "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # A secret with characters JSON escapes appears escaped: mask that spelling too.
        return self._mask(self._mask.escaped(json.dumps(entry, ensure_ascii=False)))


# Libraries whose INFO output is noise for an operator.
_QUIET = ("transformers", "huggingface_hub", "urllib3", "httpx", "asyncio", "aiosqlite",
          "sqlalchemy", "alembic", "filelock", "accelerate", "sentence_transformers")


def configure_logging(level: str = "INFO", secrets: Iterable[str] = (),
                      log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if log_format == "json" else MaskingFormatter(
        secrets, "%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLevelName(level)))
