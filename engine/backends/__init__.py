"""Generation backends behind one small interface (``Backend``).

``transformers`` runs the model in-process, on a worker thread or in an engine process of
its own (``process_backend.py``); ``openai`` talks to any OpenAI-compatible
server; ``scripted`` is deterministic, for replay tests. Backends are created by name with
``create_backend`` so the heavy ones import their libraries only when chosen.
"""

from __future__ import annotations

from pathlib import Path

from engine.backends.base import Backend
from engine.config import LLMConfig

__all__ = ["Backend", "create_backend", "parallel_requests"]

# In flight to a vLLM-class server, which batches them itself.
OPENAI_PARALLEL_REQUESTS = 32
SCRIPTED_PARALLEL_REQUESTS = 4


def create_backend(config: LLMConfig, cache_dir: Path | None = None) -> Backend:
    """The backend ``config.backend`` names (``models.llm.backend``)."""
    if config.backend == "scripted":
        from engine.backends.scripted import ScriptedBackend

        return ScriptedBackend(config.scripted.replies, config.scripted.chunk_delay_s)
    if config.backend == "transformers":
        from engine.backends import process_backend

        if process_backend.wanted(config):
            return process_backend.ProcessBackend(config, cache_dir)
        from engine.backends.transformers_backend import TransformersBackend

        return TransformersBackend(config, cache_dir)
    if config.backend == "openai":
        from engine.backends.openai_backend import OpenAIBackend

        return OpenAIBackend(config.openai)
    raise ValueError(f"models.llm.backend: unknown backend {config.backend!r}")


def parallel_requests(config: LLMConfig) -> int:
    """How many requests the backend ``config`` names serves at once to good effect: the
    in-process model batches up to ``max_batch_size`` (rows join between decode steps); an
    OpenAI-compatible server batches on its side, so more may be in flight; the scripted
    backend answers at once."""
    if config.backend == "transformers":
        return config.max_batch_size
    return OPENAI_PARALLEL_REQUESTS if config.backend == "openai" else SCRIPTED_PARALLEL_REQUESTS
