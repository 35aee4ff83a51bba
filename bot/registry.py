"""Adapters are found by name, imported only when enabled (``bot`` never imports them at
import time, and a missing platform extra is a clear error, not an ImportError)."""

from __future__ import annotations

import importlib
from typing import Any

from bot.errors import AdapterUnavailableError

ADAPTERS: dict[str, tuple[str, str]] = {
    # name: (module:attribute, pip extra that provides its platform library)
    "console": ("adapters.console:ConsoleAdapter", ""),
    "discord": ("adapters.discord_adapter:DiscordAdapter", "discord"),
    "twitch": ("adapters.twitch_adapter:TwitchAdapter", "twitch"),
}


def load_adapter_class(name: str) -> Any:
    try:
        target, extra = ADAPTERS[name]
    except KeyError:
        raise AdapterUnavailableError(
            f"adapters.{name}: unknown adapter; known: {', '.join(sorted(ADAPTERS))}"
        ) from None
    module_name, _, attribute = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        hint = (f" (make extras EXTRAS={extra}, or pip install 'vtuber-bot[{extra}]')"
                if extra else "")
        raise AdapterUnavailableError(
            f"adapters.{name}: cannot load {module_name}: {exc}{hint}"
        ) from None
    return getattr(module, attribute)
