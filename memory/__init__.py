"""Per-user conversation history, relationship state and retrievable memories.

Import the submodules you need (``memory.store``); this package imports nothing heavy.
"""
