"""Runtime wiring, the conversation service, commands and the CLI (`vtuber-bot`).

Nothing here runs at import time: importing ``bot`` loads no config, model or client.
"""

__version__ = "0.1.0"
