"""``Engine``: what the runtime talks to (``engine.client.EngineClient``). It owns the
backend's life, assembles prompts, streams generation through the output stage and reports
on the model and the GPUs. The seed's facade (``engine.llm_manager.LLMManager``) stands on it.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from engine import gpu_manager
from engine.backends import Backend, create_backend, parallel_requests
from engine.client import EngineHealth, PromptInputs
from engine.config import EngineConfig
from engine.embedder import Embedder
from engine.errors import BackendUnavailableError, EngineConfigError, EngineError
from engine.model_loader import model_path_problems
from engine.persona import Persona, load_persona, prompt_language, state_hint
from engine.reports import AllocationReport, GpuStatus, OptimizeReport
from engine.response_generator import (
    Blocklist,
    PostProcessing,
    ResponseGenerator,
    build_messages,
    finish_text,
)
from engine.secret_scan import SecretScanner
from engine.text_filters import FilterOptions, complete_sentences
from engine.types import GeneratedReply, GenerationRequest, ReplyChunk

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        config: Mapping[str, Any] | EngineConfig,
        *,
        cache_dir: str | Path | None = None,
        persona: Persona | None = None,
        backend: Backend | None = None,
        moderate: Callable[[str], str | None] | None = None,
        redact: Callable[[str], str] | None = None,  # masks secrets in every output
    ) -> None:
        self.config = EngineConfig.from_mapping(config)
        self._cache_dir = Path(cache_dir) if cache_dir is not None else None
        self._persona = persona
        self._backend = backend
        # An external moderation hook, else the config's blocklist (if any).
        blocklist = self.config.vtuber.moderation.blocklist
        self._moderate = moderate or (Blocklist(blocklist) if blocklist else None)
        self._moderation_hook = moderate is not None
        self._redact = redact or SecretScanner()
        self._generator: ResponseGenerator | None = None
        self._embedder: Embedder | None = None
        self.last_error: str | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the persona and start the backend; raise ``EngineError`` with the cause."""
        if self._generator is not None:
            return
        if self._persona is None:
            self._persona = load_persona(self.config.vtuber.persona)
        if self._backend is None:
            self.check_model_paths()
        backend = self._backend or create_backend(self.config.llm, self._cache_dir)
        await backend.start()
        self._backend = backend
        self._generator = ResponseGenerator(backend)
        if self.config.embedding.enabled:
            self._embedder = Embedder(self.config.embedding, self._embedder_device(backend))

    def check_model_paths(self) -> None:
        """All configured model paths, before any model loads: every wrong one is reported
        at once, not the embedder's after the LLM took half a minute."""
        config = self.config
        problems = model_path_problems(config.llm.backend, config.llm.model_path,
                                       config.llm.gguf_file, config.embedding.model_path,
                                       config.embedding.enabled)
        if problems:
            raise EngineConfigError(problems)

    def _embedder_device(self, backend: Backend) -> str:
        """Configured device, else the placement policy's choice, else whatever is free."""
        wanted = self.config.embedding.device
        if wanted != "auto":
            return "cuda:0" if wanted == "cuda" else wanted
        placement = getattr(backend, "placement", None)
        if placement is None:
            devices = gpu_manager.discover_devices()
            placement = gpu_manager.plan_placement(devices)
        return placement.embedder_device

    async def aclose(self) -> None:
        backend, self._backend, self._generator = self._backend, None, None
        if backend is not None:
            await backend.close()
        if self._embedder is not None:
            self._embedder.close()
            self._embedder = None

    # -- generation -----------------------------------------------------------------------

    @property
    def persona(self) -> Persona:
        if self._persona is None:
            raise BackendUnavailableError("the engine is not started")
        return self._persona

    def replace_persona(self, persona: Persona) -> None:
        """Use ``persona`` from the next request on (a reload: the model stays loaded)."""
        self._persona = persona

    def replace_blocklist(self, patterns: list[str]) -> None:
        """Moderate with ``patterns`` from the next reply on (a reload); an external
        moderation hook, where one was given, stays."""
        if not self._moderation_hook:
            self._moderate = Blocklist(patterns) if patterns else None

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            raise BackendUnavailableError("the engine is not started")
        return self._backend

    def post_processing(self, conversion_mode: str | None = None, language: str = "zh",
                        private: tuple[str, ...] = ()) -> PostProcessing:
        persona = self.persona
        # The viewer's language first; an echo of the other language's prompt is a leak too.
        prompts = tuple(dict.fromkeys(persona.system_prompt(lang)
                                      for lang in (language, "zh", "en")))
        return PostProcessing(
            moderate=self._moderate, redact=self._redact,
            filter_options=FilterOptions(
                persona_names=persona.names.all(),
                filter_repetition=self.config.response.filter_repetition,
                fallback=persona.fallback(),
                system_prompt="\n".join(prompts),
                echo_allowed=persona.own_phrases(),
            ),
            conversion_mode=conversion_mode or self.config.response.conversion_mode,
            protected_terms=tuple(persona.protected_terms),
            echo_sources=prompts + private,
        )

    def build_request(self, inputs: PromptInputs, *,
                      request_id: str | None = None) -> GenerationRequest:
        """The one place prompts are assembled (``build_messages``: laid out for prefix
        reuse): the persona's system prompt in the viewer's language, the history, then the
        mood/intimacy hint and trusted context, the viewer's notes, the message."""
        persona = self.persona
        limit = self.config.response.max_input_chars
        text = inputs.text if len(inputs.text) <= limit else inputs.text[:limit - 1] + "…"
        language = prompt_language(text)
        hint = (state_hint(inputs.state, persona, language) if inputs.state is not None
                else None)
        messages = build_messages(persona.system_prompt(language), text,
                                  inputs.history, inputs.context, hint, inputs.user_notes)
        request = GenerationRequest(messages, self.config.sampling(), language=language,
                                    private=(hint,) if hint else ())
        return request if request_id is None else replace(request, request_id=request_id)

    async def generate(self, request: GenerationRequest, *, conversion_mode: str | None = None
                       ) -> AsyncGenerator[ReplyChunk | GeneratedReply, None]:
        if self._generator is None:
            raise BackendUnavailableError("the engine is not started")
        post = self.post_processing(conversion_mode, request.language, request.private)
        async for out in self._generator.generate(request, post):
            if isinstance(out, GeneratedReply):
                out.context = {"backend": self.config.llm.backend, "model": self.model_name,
                               "request_id": request.request_id,
                               "sampling": request.sampling.trace()}
            yield out

    async def final_reply(self, request: GenerationRequest, *,
                          conversion_mode: str | None = None) -> GeneratedReply:
        """``generate`` read to its end, for callers that show nothing while it streams."""
        async for out in self.generate(request, conversion_mode=conversion_mode):
            if isinstance(out, GeneratedReply):
                return out
        raise EngineError(f"request {request.request_id}: the stream ended without a reply")

    def preview(self, raw: str, request: GenerationRequest, *,
                conversion_mode: str | None = None) -> str:
        """A partial reply as it may be shown while streaming: filtered and converted like the
        final one, but never the fallback line ("" while nothing is showable yet)."""
        post = self.post_processing(conversion_mode, request.language, request.private)
        text, edits = finish_text(raw, post)
        if "fallback" in edits:
            return ""
        # Only whole sentences: a prompt echo or a role label still being written is only
        # recognisable once complete, and must never have been shown by then.
        return complete_sentences(text)

    async def abort(self, request_id: str) -> None:
        if self._backend is not None:
            await self._backend.abort(request_id)

    def health(self) -> EngineHealth:
        backend = self._backend
        if backend is None:
            return EngineHealth(ok=False, backend=self.config.llm.backend, model="",
                                detail=self.last_error or "not started")
        report = backend.health()
        return EngineHealth(ok=bool(report.get("ok")), backend=backend.name,
                            model=self.model_name, detail=None)

    def counters(self) -> dict[str, float]:
        """The backend's numbers for metrics (requests queued and in flight; in process, the
        batching loop's totals); empty before start."""
        if self._backend is None:
            return {}
        report = self._backend.health()
        return {key: float(value) for key, value in report.items()
                if isinstance(value, int | float) and not isinstance(value, bool)}

    @property
    def model_name(self) -> str:
        info = self._backend.info() if self._backend is not None else {}
        return str(info.get("model_dir") or info.get("model") or self.config.llm.backend)

    def count_tokens(self, text: str) -> int:
        return self.backend.count_tokens(text)

    def parallel_requests(self) -> int:
        return parallel_requests(self.config.llm)

    # -- reports --------------------------------------------------------------------------

    @property
    def embedder(self) -> Embedder | None:
        return self._embedder

    def get_gpu_status(self) -> GpuStatus:
        return gpu_manager.gpu_status()

    def optimize_gpu_memory(self) -> OptimizeReport:
        return gpu_manager.optimize_gpu_memory()

    def diagnose_gpu_allocation(self) -> AllocationReport:
        info = self._backend.info() if self._backend is not None else {}
        if "allocation" in info:  # the model is in an engine process, which mapped it
            report: AllocationReport = info["allocation"]
            return report
        return gpu_manager.diagnose_allocation(getattr(self._backend, "model", None),
                                               getattr(self._backend, "placement", None))

    def get_model_info(self) -> dict[str, Any]:
        info = self._backend.info() if self._backend is not None else {"backend": None}
        load: dict[str, Any] = info.get("load") or {}
        return {
            **info,
            "initialized": self._generator is not None,
            "persona": self._persona.id if self._persona else None,
            "loading_mode": load.get("mode", info.get("backend")),
            "optimizations_applied": self._optimizations(info),
            "embedding_model": self.config.embedding.model_path or "all-MiniLM-L6-v2 (bundled)",
            "embedding_loaded": bool(self._embedder and self._embedder.loaded),
            "gpu_cluster": {**self.get_gpu_status(),
                            "placement": info.get("placement")},
            "last_error": self.last_error,
        }

    @staticmethod
    def _optimizations(info: Mapping[str, Any]) -> list[str]:
        applied = ["worker-thread generation", "chat templates", "streaming"]
        mode = info.get("load", {}).get("mode")
        if info.get("max_batch_size", 1) > 1:
            applied.append(f"micro-batching (max {info['max_batch_size']})")
        if info.get("static_cache"):
            applied.append("static KV cache + torch.compile")
        if mode in ("4bit", "8bit"):
            applied.append(f"bitsandbytes {mode}")
        if mode == "int4":
            applied.append("int4 weight-only (tinygemm)")
        if mode == "half":
            applied.append("half precision")
        return applied
