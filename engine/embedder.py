"""Sentence embeddings (mean pooling, L2-normalised float32), loaded lazily on first use."""

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
        self.model: Any = None
        self.tokenizer: Any = None

    @property
    def loaded(self) -> bool:
        return self.model is not None

    def load(self) -> None:
        with self._lock:
            if self.model is None:
                self.model, self.tokenizer, path = load_embedder(
                    self._config.model_path, self._device, self._config.quantization)
                log.info("Embedder loaded from %s on %s", path, self._device)

    @property
    def dimension(self) -> int:
        self.load()
        return int(self.model.config.hidden_size)

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        self.load()
        if not texts:
            return np.zeros((0, self.dimension), dtype=np.float32)
        vectors = []
        size = self._config.batch_size
        with self._lock, torch.inference_mode():
            for start in range(0, len(texts), size):
                batch = self.tokenizer(
                    texts[start:start + size], padding=True, truncation=True,
                    max_length=self._config.max_length, return_tensors="pt",
                ).to(self.model.device)
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
                vectors.append(pooled.float().cpu().numpy())
        return np.concatenate(vectors).astype(np.float32)

    def close(self) -> None:
        with self._lock:
            self.model = None
            self.tokenizer = None
