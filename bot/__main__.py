"""``python -m bot`` is the same as the ``vtuber-bot`` command."""

from bot.cli import main

raise SystemExit(main())
