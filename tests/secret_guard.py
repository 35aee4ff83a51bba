"""Session-wide check that no configured secret reaches a log line or a traceback.

Every ``Secrets`` the suite builds registers its values here, and so does the environment of
every CLI subprocess a test starts. Every log record the product or a library creates is
rendered (message and traceback) and searched for them; a subprocess's stdout and stderr are
searched the same way. Records from the tests' own loggers (``tests.*``) are exempt: the
masking test writes a secret on purpose to see it masked.
"""

from __future__ import annotations

import logging
import os
import traceback
from collections.abc import Callable, Mapping
from typing import Any

MIN_LENGTH = 4  # the product does not mask shorter values either
SECRET_ENV = ("DISCORD_TOKEN", "TWITCH_CLIENT_ID", "TWITCH_CLIENT_SECRET", "TWITCH_ACCESS_TOKEN",
              "TWITCH_REFRESH_TOKEN", "OPENAI_API_KEY", "VTUBER_DATABASE_URL")

_secrets: set[str] = set()
leaks: list[str] = []


def register(values: list[str] | tuple[str, ...] | set[str]) -> None:
    _secrets.update(v for v in values if len(v) >= MIN_LENGTH)


def register_env(env: Mapping[str, str]) -> None:
    register([env[name] for name in SECRET_ENV if env.get(name)])


def _current_test() -> str:
    return os.environ.get("PYTEST_CURRENT_TEST", "(outside a test)").rsplit(" ", 1)[0]


def observe(text: str, where: str) -> None:
    """Record a leak for every registered secret found in ``text``."""
    for secret in _secrets:
        if secret in text:
            leaks.append(f"{_current_test()}: {where} contains a secret "
                         f"({secret[:2]}…, {len(secret)} characters)")


def observe_process(env: Mapping[str, str] | None, stdout: str | None,
                    stderr: str | None) -> None:
    register_env(env or {})
    observe(f"{stdout or ''}\n{stderr or ''}", "a CLI subprocess's output")


def _render(record: logging.LogRecord) -> str:
    try:
        text = record.getMessage()
    except (TypeError, ValueError):  # a bad format string is the logging module's to report
        text = str(record.msg)
    if record.exc_info and record.exc_info[1] is not None:
        text += "".join(traceback.format_exception(record.exc_info[1]))
    return text


def install() -> None:
    """Check every log record as it is created, whatever handlers a test installs."""
    from bot.config import Secrets

    original_from_env = Secrets.from_env.__func__  # type: ignore[attr-defined]

    def from_env(cls: type[Secrets], env: Mapping[str, str], *args: Any,
                 **kwargs: Any) -> Secrets:
        secrets: Secrets = original_from_env(cls, env, *args, **kwargs)
        register(secrets.values())
        return secrets

    Secrets.from_env = classmethod(from_env)  # type: ignore[method-assign, assignment]
    make_record: Callable[..., logging.LogRecord] = logging.getLogRecordFactory()

    def checked_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        if _secrets and not record.name.startswith("tests"):
            observe(_render(record), f"a log record from {record.name}")
        return record

    logging.setLogRecordFactory(checked_record)
    # INFO and above are what an operator's log shows; check them all, not only warnings.
    root = logging.getLogger()
    if root.level > logging.INFO:
        root.setLevel(logging.INFO)
