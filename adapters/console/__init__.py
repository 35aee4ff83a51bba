"""Local REPL adapter (and ``--once``): the embedded default's main job."""

from adapters.console.adapter import ConsoleAdapter

__all__ = ["ConsoleAdapter"]
