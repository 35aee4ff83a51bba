"""Generation backends behind one small interface (``Backend``).

``transformers`` runs in-process on a worker thread; ``openai`` talks to any OpenAI-compatible
server; ``scripted`` is deterministic, for replay tests. Backends are created by name with
``create_backend`` so the heavy ones import their libraries only when chosen.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.backends.base import Backend

if TYPE_CHECKING:
    from engine.settings import EngineSettings

__all__ = ["Backend", "create_backend"]


def create_backend(settings: EngineSettings, **kwargs: Any) -> Backend:
    name = settings.backend
    if name == "scripted":
        from engine.backends.scripted import ScriptedBackend

        return ScriptedBackend(settings.scripted_replies)
    if name == "transformers":
        from engine.backends.transformers_backend import TransformersBackend

        return TransformersBackend(settings, **kwargs)
    if name == "openai":
        from engine.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(settings)
    raise ValueError(f"models.llm.backend: unknown backend {name!r}")
