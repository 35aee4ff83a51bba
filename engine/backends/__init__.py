"""Generation backends behind one small interface (``Backend``).

``transformers`` runs in-process on a worker thread; ``openai`` talks to any OpenAI-compatible
server; ``scripted`` is deterministic, for replay tests. Backends are created by name with
``create_backend`` so the heavy ones import their libraries only when chosen.
"""

from __future__ import annotations

from pathlib import Path

from engine.backends.base import Backend
from engine.config import LLMConfig

__all__ = ["Backend", "create_backend"]


def create_backend(config: LLMConfig, cache_dir: Path | None = None) -> Backend:
    """The backend ``config.backend`` names (``models.llm.backend``)."""
    if config.backend == "scripted":
        from engine.backends.scripted import ScriptedBackend

        return ScriptedBackend(config.scripted.replies, config.scripted.chunk_delay_s)
    if config.backend == "transformers":
        from engine.backends.transformers_backend import TransformersBackend

        return TransformersBackend(config, cache_dir)
    if config.backend == "openai":
        from engine.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(config.openai)
    raise ValueError(f"models.llm.backend: unknown backend {config.backend!r}")
