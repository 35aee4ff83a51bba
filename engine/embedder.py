"""Sentence embeddings through sentence-transformers, loaded lazily on first use.

The model directory's own sentence-transformers config decides pooling (mean for the bundled
MiniLM, last token for Qwen3-Embedding) and the query instruction (``prompts["query"]``), so a
model is embedded the way it was trained. Vectors are L2-normalised float32.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

import numpy as np

from engine.config import EmbeddingConfig
from engine.model_loader import load_embedder

log = logging.getLogger(__name__)


class Embedder:
    """Texts → float32 vectors. Thread-safe; call it off the event loop (it is blocking)."""

    def __init__(self, config: EmbeddingConfig, device: str = "cpu") -> None:
        self._config = config
        self._device = device
        self._lock = threading.Lock()
        self.model: Any = None  # a SentenceTransformer

    @property
    def loaded(self) -> bool:
        return self.model is not None

    @property
    def tokenizer(self) -> Any:
        self.load()
        return self.model.tokenizer

    def load(self) -> None:
        with self._lock:
            if self.model is None:
                self.model, path = load_embedder(self._config.model_path, self._device,
                                                 self._config.quantization)
                self.model.max_seq_length = self._config.max_length
                log.info("Embedder loaded from %s on %s", path, self._device)

    @property
    def dimension(self) -> int:
        self.load()
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], *, query: bool = False) -> np.ndarray:
        """Documents by default; ``query=True`` adds the model's query instruction, if it
        has one (retrieval models embed questions and passages differently)."""
        self.load()
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        prompt = "query" if query and self.model.prompts.get("query") else None
        with self._lock:
            vectors = self.model.encode(
                list(texts), prompt_name=prompt, batch_size=self._config.batch_size,
                normalize_embeddings=True, convert_to_numpy=True, show_progress_bar=False)
        return np.asarray(vectors, dtype=np.float32)

    def close(self) -> None:
        with self._lock:
            self.model = None
