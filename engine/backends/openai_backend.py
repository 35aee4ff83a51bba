"""Backend for any OpenAI-compatible chat server (vLLM, llama.cpp server, Ollama, LM Studio,
``transformers serve``): the scale-out path, through the official ``openai`` SDK (streaming,
typed chunks, usage per request; servers' extra fields such as ``reasoning_content`` or vLLM's
``stop_reason`` are ignored).

Retries are ours, not the SDK's: a live reply may be retried only before its first token (a
retry after that would repeat text to the viewer), and a server's ``Retry-After`` is honoured
only up to ``MAX_RETRY_AFTER_S``; beyond it the viewer is better served by the fallback now.
A server over capacity (429, 503) lowers how many requests are sent at once and the refused
one waits its turn again, within ``timeout_s``; a server that cannot be reached opens a
circuit breaker, and replies fail at once until it answers again (``server_pace``).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, cast

import httpx2
import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from engine.backends.base import RecentUsage
from engine.backends.server_pace import CircuitBreaker, ConcurrencyLimit, jittered
from engine.config import OpenAIBackendConfig
from engine.errors import BackendUnavailableError, EngineError
from engine.prompt_text import defuse
from engine.types import GenerationRequest, PromptUsage

log = logging.getLogger(__name__)

MAX_RETRY_AFTER_S = 30.0
_RETRY_STATUS = {408, 409, 429, 500, 502, 503, 504}
_OVERLOADED = {429, 503}  # over capacity: fewer at once, not fewer tries
# Fields beyond the OpenAI API that vLLM and llama.cpp understand; a server that refuses them
# (400/422 naming one) gets requests without them from then on.
_EXTRA_FIELDS = ("top_k", "repetition_penalty", "min_tokens", "chat_template_kwargs",
                 "skip_special_tokens")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")


class _Retryable(Exception):
    def __init__(self, message: str, retry_after_s: float | None = None, *,
                 overloaded: bool = False, unreachable: bool = False) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.overloaded = overloaded  # over capacity: wait a turn, not an attempt
        self.unreachable = unreachable  # no connection: counts toward the breaker


class _ExtrasRefused(Exception):
    """The server rejects the non-standard sampling fields (top_k, repetition_penalty)."""


class _LateSystemRefused(Exception):
    """The server's chat template takes a system turn only at the start."""


# What a template's refusal of a later system turn says (Gemma, Mistral, Llama 2 and kin).
_LATE_SYSTEM_REFUSAL = re.compile(r"system|alternate|role", re.I)


def _prompt_usage(usage: dict[str, Any]) -> PromptUsage:
    """The server's count of prompt tokens, and of those its prefix cache held (vLLM says so
    in ``prompt_tokens_details`` when started with ``--enable-prompt-tokens-details``)."""
    details = usage.get("prompt_tokens_details") or {}
    return PromptUsage(int(usage.get("prompt_tokens") or 0),
                       int(details.get("cached_tokens") or 0))


def retry_after_s(headers: httpx2.Headers) -> float | None:
    """``Retry-After`` in seconds (a number or an HTTP date), if the server sent one."""
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        moment = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, (moment - datetime.now(UTC)).total_seconds())


class OpenAIBackend:
    name = "openai"

    def __init__(self, config: OpenAIBackendConfig,
                 http_client: httpx2.AsyncClient | None = None) -> None:
        self._base_url = config.base_url.rstrip("/")
        self._model = config.model
        self._api_key = config.api_key.get_secret_value() if config.api_key else None
        self._timeout = config.timeout_s
        self._max_retries = config.max_retries
        self._extra_sampling = config.extra_sampling
        self._fold_system = False  # set once the server refused a later system turn
        self._http_client = http_client
        self._client: AsyncOpenAI | None = None
        self._in_flight: dict[str, asyncio.Task[Any] | None] = {}
        self._limit = ConcurrencyLimit(config.max_in_flight)
        self._breaker = CircuitBreaker()
        self.last_usage: dict[str, Any] | None = None
        self._usage = RecentUsage()
        self.last_finish_reason: str | None = None

    async def start(self) -> None:
        self._client = AsyncOpenAI(
            base_url=self._base_url, api_key=self._api_key or "unused", max_retries=0,
            timeout=httpx2.Timeout(self._timeout, connect=min(10.0, self._timeout)),
            http_client=self._http_client)
        models = await self._list_models()
        if self._model == "default":
            if not models:
                raise BackendUnavailableError(
                    f"models.llm.openai.base_url: {self._base_url} lists no models; set "
                    "models.llm.openai.model")
            self._model = models[0]
        log.info("openai backend: %s, model %s", self._base_url, self._model)

    async def _list_models(self) -> list[str]:
        assert self._client is not None
        try:
            return [model.id async for model in self._client.models.list()]
        except openai.OpenAIError as exc:
            raise BackendUnavailableError(
                f"models.llm.openai.base_url: cannot reach {self._base_url}: "
                f"{type(exc).__name__}: {exc}") from None

    def _extra_body(self, request: GenerationRequest) -> dict[str, Any] | None:
        if not self._extra_sampling:  # vLLM / llama.cpp extensions; others refuse them
            return None
        sampling = request.sampling
        return {"top_k": sampling.top_k, "repetition_penalty": sampling.repetition_penalty,
                "min_tokens": sampling.min_new_tokens,
                # Qwen3-style templates: a thinking model would spend the whole budget
                # thinking; live chat wants the answer.
                "chat_template_kwargs": {"enable_thinking": False},
                # A turn boundary the model writes arrives as its token's text, so the
                # output stage cuts the reply there; skipped, "<|im_start|>user" would arrive
                # as "user" glued to the reply. (A stop list cannot say it: servers take 4.)
                "skip_special_tokens": False}

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self._client is None:
            raise BackendUnavailableError("openai backend is not started")
        self._in_flight[request.request_id] = asyncio.current_task()
        deadline = time.monotonic() + self._timeout
        try:
            attempt = 0
            while True:
                self._refuse_while_down()
                await self._limit.acquire()
                yielded, failure = False, None
                try:
                    async for chunk in self._stream_once(request):
                        yielded = True
                        yield chunk
                    self._reached()
                    return
                except _ExtrasRefused:
                    log.info("%s refuses top_k/repetition_penalty/min_tokens; sending only "
                             "standard OpenAI sampling fields from now on", self._base_url)
                    self._extra_sampling = False
                except _LateSystemRefused:
                    log.info("%s takes a system turn only at the start; the state hint and "
                             "context join the persona's from now on (no prefix reuse for "
                             "returning viewers)", self._base_url)
                    self._fold_system = True
                except _Retryable as exc:
                    failure = exc
                finally:
                    await self._limit.release(refused=bool(failure and failure.overloaded))
                if failure is not None:
                    await self._before_retry(failure, attempt, yielded, deadline)
                    attempt += 0 if failure.overloaded else 1
        finally:
            self._in_flight.pop(request.request_id, None)

    def _refuse_while_down(self) -> None:
        wait = self._breaker.retry_in_s()
        if wait is not None:
            raise BackendUnavailableError(
                f"{self._base_url} is unreachable; next try in {wait:.0f} s")

    def _reached(self) -> None:
        if self._breaker.succeeded():
            log.warning("%s answers again", self._base_url)

    async def _before_retry(self, exc: _Retryable, attempt: int, yielded: bool,
                            deadline: float) -> None:
        """Wait before the next attempt, or give up with ``BackendUnavailableError``."""
        if exc.unreachable and self._breaker.failed():
            log.error("%s is unreachable (%s); replies fail at once until it answers",
                      self._base_url, exc)
        wait = exc.retry_after_s
        delay = wait if wait is not None else jittered(0.5 * 2**min(attempt, 4))
        if (yielded or attempt == self._max_retries or self._breaker.is_open
                or (wait is not None and wait > MAX_RETRY_AFTER_S)
                or time.monotonic() + delay > deadline):
            raise BackendUnavailableError(
                f"{self._base_url}: {exc} (after {attempt + 1} attempt(s))") from None
        if exc.overloaded:
            log.debug("%s over capacity (%s); at most %d requests at once, retrying in "
                      "%.1f s", self._base_url, exc, int(self._limit.limit), delay)
        else:
            log.info("openai backend: %s; retrying in %.1f s", exc, delay)
        await asyncio.sleep(delay)

    async def _stream_once(self, request: GenerationRequest) -> AsyncIterator[str]:
        assert self._client is not None
        sampling = request.sampling
        try:
            stream = await self._client.chat.completions.create(
                model=self._model,
                messages=cast("list[ChatCompletionMessageParam]", [
                    {**message, "content": defuse(message["content"])}
                    for message in request.as_dicts(fold_system=self._fold_system)]),
                # (defused: no viewer-made turns)
                stream=True, stream_options={"include_usage": True},
                max_tokens=sampling.max_new_tokens, temperature=sampling.temperature,
                top_p=sampling.top_p, seed=sampling.seed,
                extra_body=self._extra_body(request))
            finished: str | None = None
            async for chunk in stream:
                if chunk.usage is not None:
                    self.last_usage = chunk.usage.model_dump()
                    self._usage.record(request.request_id, _prompt_usage(self.last_usage))
                for choice in chunk.choices[:1]:
                    if choice.finish_reason:
                        self.last_finish_reason = finished = choice.finish_reason
                    if choice.delta.content:
                        yield choice.delta.content
            if not finished:  # a cut connection must not pass for a complete reply
                raise _Retryable("the stream ended before the reply finished")
        except openai.APIStatusError as exc:
            raise self._status_error(exc, request) from None
        except (openai.APIConnectionError, httpx2.TransportError) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}", unreachable=True) from None

    def _status_error(self, exc: openai.APIStatusError,
                      request: GenerationRequest) -> Exception:
        status = exc.status_code
        if status in _RETRY_STATUS:
            wait = retry_after_s(exc.response.headers)
            return _Retryable(f"HTTP {status}" + (
                f", Retry-After {wait:.0f} s" if wait is not None else ""), wait,
                overloaded=status in _OVERLOADED)
        detail = str(exc.body or exc.message)[:300]
        if (self._extra_sampling and status in (400, 422)
                and any(field in detail for field in _EXTRA_FIELDS)):
            return _ExtrasRefused(detail)
        if (not self._fold_system and status in (400, 422)
                and _LATE_SYSTEM_REFUSAL.search(detail)
                and any(m.role == "system" for m in request.messages[1:])):
            return _LateSystemRefused(detail)
        return EngineError(f"{self._base_url} refused the request: HTTP {status}: {detail}")

    async def abort(self, request_id: str) -> None:
        task = self._in_flight.get(request_id)
        if task is not None:
            task.cancel()

    def health(self) -> dict[str, Any]:
        return {"ok": self._client is not None, "backend": self.name,
                "base_url": self._base_url, "in_flight": len(self._in_flight)}

    def info(self) -> dict[str, Any]:
        return {"backend": self.name, "model": self._model, "base_url": self._base_url,
                "load": {"mode": "remote"}}

    def prompt_usage(self, request_id: str) -> PromptUsage | None:
        return self._usage.pop(request_id)

    def count_tokens(self, text: str) -> int:
        """An estimate (no tokenizer here): a CJK character ≈ 1 token, else ≈ 4 characters."""
        if not text:
            return 0
        cjk = len(_CJK.findall(text))
        return max(1, cjk + (len(text) - cjk) // 4)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None
