"""``python -m bot`` is the same as the ``vtuber-bot`` command."""

from bot.cli import main

if __name__ == "__main__":  # not when a spawned engine process imports it
    raise SystemExit(main())
