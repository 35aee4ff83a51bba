"""In-process transformers backend.

All torch work runs on one dedicated worker thread (never on the event loop); tokens stream
back to the caller's loop through ``call_soon_threadsafe``. Cancelling the consumer sets an
abort flag that a stopping criterion checks between decode steps.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from engine.errors import BackendUnavailableError, GenerationAborted
from engine.gpu_manager import Placement, discover_devices, plan_placement
from engine.model_loader import LoadReport, load_llm, resolve_llm_dir
from engine.settings import EngineSettings
from engine.types import GenerationRequest

log = logging.getLogger(__name__)

_END = object()


class IncrementalDecoder:
    """Turns a growing list of token ids into text deltas without splitting UTF-8 sequences."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._emitted = 0

    def push(self, token_ids: list[int]) -> str:
        self._ids.extend(token_ids)
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # an incomplete multi-byte character; wait for more
            return ""
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta

    def flush(self) -> str:
        text = self._tokenizer.decode(self._ids, skip_special_tokens=True)
        delta = text[self._emitted:]
        self._emitted = len(text)
        return delta.rstrip("\ufffd")


class _CallbackStreamer:
    """transformers ``BaseStreamer`` duck type: receives the prompt first, then new tokens."""

    def __init__(self, decoder: IncrementalDecoder, emit: Callable[[str], None]) -> None:
        self._decoder = decoder
        self._emit = emit
        self._prompt_seen = False

    def put(self, value: Any) -> None:
        if not self._prompt_seen:  # generate() first hands us the prompt ids
            self._prompt_seen = True
            return
        delta = self._decoder.push(value.reshape(-1).tolist())
        if delta:
            self._emit(delta)

    def end(self) -> None:
        tail = self._decoder.flush()
        if tail:
            self._emit(tail)


class TransformersBackend:
    name = "transformers"

    def __init__(self, settings: EngineSettings, placement: Placement | None = None) -> None:
        self._settings = settings
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="llm-worker")
        self._placement = placement
        self._aborts: dict[str, threading.Event] = {}
        self.model: Any = None
        self.tokenizer: Any = None
        self.report = LoadReport()
        self.model_dir: Path | None = None
        self._closed = False

    @property
    def placement(self) -> Placement | None:
        return self._placement

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._load)

    def _load(self) -> None:
        settings = self._settings
        if self._placement is None:
            self._placement = plan_placement(discover_devices(), settings.device)
        cache = settings.cache_dir or Path.cwd() / ".cache"
        self.model_dir = resolve_llm_dir(settings.model_path, settings.gguf_file, cache)
        self.model, self.tokenizer = load_llm(
            self.model_dir, settings.quantization, self._placement, self.report
        )
        log.info("LLM loaded from %s (%s on %s) in %.1f s", self.model_dir, self.report.mode,
                 self.report.device, self.report.seconds)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self.model is None or self._closed:
            raise BackendUnavailableError("transformers backend is not started")
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        abort = threading.Event()
        self._aborts[request.request_id] = abort

        def emit(item: Any) -> None:
            loop.call_soon_threadsafe(chunks.put_nowait, item)

        future = loop.run_in_executor(self._executor, self._generate_blocking, request,
                                      abort, emit)
        try:
            while True:
                item = await chunks.get()
                if item is _END:
                    break
                yield item
            await future  # re-raise a worker exception here
        finally:
            abort.set()  # consumer gone (done, error or cancelled): stop decoding
            self._aborts.pop(request.request_id, None)

    def _generate_blocking(self, request: GenerationRequest, abort: threading.Event,
                           emit: Callable[[Any], None]) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _AbortCriterion(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), abort.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        try:
            if abort.is_set():
                raise GenerationAborted(request.request_id)
            inputs = self._encode(request)
            sampling = request.sampling
            kwargs: dict[str, Any] = {
                "max_new_tokens": sampling.max_new_tokens,
                "min_new_tokens": sampling.min_new_tokens or None,
                "repetition_penalty": sampling.repetition_penalty,
                "pad_token_id": self.tokenizer.pad_token_id,
                "stopping_criteria": StoppingCriteriaList([_AbortCriterion()]),
                "streamer": _CallbackStreamer(IncrementalDecoder(self.tokenizer), emit),
            }
            if sampling.greedy:
                kwargs["do_sample"] = False
            else:
                kwargs.update(do_sample=True, temperature=sampling.temperature,
                              top_p=sampling.top_p, top_k=sampling.top_k or None)
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            started = time.monotonic()
            with torch.inference_mode():
                self.model.generate(**inputs, **kwargs)
            log.debug("generated %s in %.2f s", request.request_id, time.monotonic() - started)
        finally:
            emit(_END)

    def _encode(self, request: GenerationRequest) -> dict[str, Any]:
        """Apply the chat template; drop the oldest history turns if the prompt is too long."""
        messages = request.as_dicts()
        budget = self._settings.max_length - request.sampling.max_new_tokens
        while True:
            encoded = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=True, return_tensors="pt",
                enable_thinking=False,
            )
            droppable = [i for i, m in enumerate(messages[:-1]) if m["role"] != "system"]
            if encoded["input_ids"].shape[-1] <= budget or not droppable:
                break
            del messages[droppable[0]]
        device = next(self.model.parameters()).device
        return {key: value.to(device) for key, value in encoded.items()}

    async def abort(self, request_id: str) -> None:
        event = self._aborts.get(request_id)
        if event is not None:
            event.set()

    def health(self) -> dict[str, Any]:
        return {"ok": self.model is not None and not self._closed, "backend": self.name,
                "in_flight": len(self._aborts)}

    def info(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "model_dir": str(self.model_dir) if self.model_dir else None,
            "load": self.report.as_dict(),
            "placement": self._placement.as_dict() if self._placement else None,
        }

    def count_tokens(self, text: str) -> int:
        if self.tokenizer is None:
            return max(1, len(text) // 3) if text else 0
        return len(self.tokenizer.encode(text, add_special_tokens=False))

    async def close(self) -> None:
        self._closed = True
        for event in self._aborts.values():
            event.set()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._executor.shutdown, True)
        self.model = None
        self.tokenizer = None
