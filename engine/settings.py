"""Engine settings read from the seed-shaped config dict.

The engine takes a plain dict (the seed's contract) so it never depends on ``bot``'s config
models. Missing keys get the same defaults as ``config.example.yaml``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.types import SamplingParams


def _section(config: Mapping[str, Any], *keys: str) -> Mapping[str, Any]:
    node: Any = config
    for key in keys:
        node = node.get(key) if isinstance(node, Mapping) else None
        if node is None:
            return {}
    return node if isinstance(node, Mapping) else {}


@dataclass(frozen=True, slots=True)
class EmbeddingSettings:
    enabled: bool = True
    device: str = "auto"
    model_path: str | None = None
    max_length: int = 256
    batch_size: int = 32
    quantization: str = "none"


@dataclass(frozen=True, slots=True)
class ResponseSettings:
    max_tokens: int = 150
    min_tokens: int = 10
    filter_repetition: bool = True
    conversion_mode: str = "s2twp"


@dataclass(frozen=True, slots=True)
class EngineSettings:
    backend: str = "transformers"
    model_path: str | None = None
    gguf_file: str | None = None
    device: str = "auto"
    quantization: str = "none"
    max_length: int = 2048
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    seed: int | None = None
    max_batch_size: int = 8
    batch_window_ms: float = 10.0
    static_cache: str = "auto"
    openai: Mapping[str, Any] = field(default_factory=dict)
    scripted_replies: tuple[str, ...] = ("收到：{user_text}",)
    embedding: EmbeddingSettings = field(default_factory=EmbeddingSettings)
    response: ResponseSettings = field(default_factory=ResponseSettings)
    persona_path: str | None = None
    cache_dir: Path | None = None

    @classmethod
    def from_config(cls, config: Mapping[str, Any], cache_dir: Path | None = None
                    ) -> EngineSettings:
        llm = _section(config, "models", "llm")
        emb = _section(config, "models", "embedding")
        resp = _section(config, "vtuber", "response")
        vtuber = _section(config, "vtuber")
        conversion = resp.get("chinese_conversion")
        if conversion is None:
            conversion = "s2twp" if resp.get("enable_traditional_chinese", True) else "off"
        defaults = cls()
        return cls(
            backend=llm.get("backend", defaults.backend),
            model_path=llm.get("model_path"),
            gguf_file=llm.get("gguf_file"),
            device=str(llm.get("device", defaults.device)),
            quantization=str(llm.get("quantization", defaults.quantization)),
            max_length=int(llm.get("max_length", defaults.max_length)),
            temperature=float(llm.get("temperature", defaults.temperature)),
            top_p=float(llm.get("top_p", defaults.top_p)),
            top_k=int(llm.get("top_k", defaults.top_k)),
            repetition_penalty=float(llm.get("repetition_penalty",
                                             defaults.repetition_penalty)),
            seed=llm.get("seed"),
            max_batch_size=int(llm.get("max_batch_size", defaults.max_batch_size)),
            batch_window_ms=float(llm.get("batch_window_ms", defaults.batch_window_ms)),
            static_cache=str(llm.get("static_cache", defaults.static_cache)),
            openai=dict(_section(llm, "openai")),
            scripted_replies=tuple(_section(llm, "scripted").get("replies")
                                   or defaults.scripted_replies),
            embedding=EmbeddingSettings(
                enabled=bool(emb.get("enabled", True)),
                device=str(emb.get("device", "auto")),
                model_path=emb.get("model_path"),
                max_length=int(emb.get("max_length", 256)),
                batch_size=int(emb.get("batch_size", 32)),
                quantization=str(emb.get("quantization", "none")),
            ),
            response=ResponseSettings(
                max_tokens=int(resp.get("max_tokens", 150)),
                min_tokens=int(resp.get("min_tokens", 10)),
                filter_repetition=bool(resp.get("filter_repetition", True)),
                conversion_mode=str(conversion),
            ),
            persona_path=vtuber.get("persona"),
            cache_dir=cache_dir,
        )

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            max_new_tokens=self.response.max_tokens,
            min_new_tokens=min(self.response.min_tokens, self.response.max_tokens),
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            repetition_penalty=self.repetition_penalty,
            seed=self.seed,
        )
