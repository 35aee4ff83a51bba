"""Start-up helpers of the runtime: what a long-lived process does once everything is loaded,
and the embedder loaded in the background."""

from __future__ import annotations

import asyncio
import gc
import logging

from engine.core import Engine

log = logging.getLogger(__name__)


def freeze_heap() -> None:
    """Libraries, the model and the persona live as long as the process: frozen, a full
    collection no longer walks them. Walking them paused the event loop 40-65 ms every
    few tens of seconds under a busy chat (docs/performance-history.md)."""
    gc.collect()
    gc.freeze()


async def load_embedder(engine: Engine) -> None:
    """Load the embedder in the background while the operator types, so the first message
    does not wait for it (seconds: sentence-transformers and the model)."""
    embedder = engine.embedder
    if embedder is None or embedder.loaded:
        return
    try:
        await asyncio.to_thread(embedder.load)
    except Exception as exc:  # noqa: BLE001 - reported again, with context, at first use
        log.warning("embedding model did not load in the background: %s: %s",
                    type(exc).__name__, exc)
