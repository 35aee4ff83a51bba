"""Backend for any OpenAI-compatible chat server (vLLM, llama.cpp server, Ollama, LM Studio,
``transformers serve``): the scale-out path. Streams ``/chat/completions`` over SSE.

Connection failures and 429/5xx answers are retried with exponential backoff, but only before
the first token arrived (a retry after that would repeat text to the viewer). Unknown fields
in the server's replies are ignored: servers add their own (vLLM's ``stop_reason``, ...).
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any

import httpx

from engine.config import OpenAIBackendConfig
from engine.errors import BackendUnavailableError, EngineError
from engine.types import GenerationRequest

log = logging.getLogger(__name__)

_RETRY_STATUS = {408, 429, 500, 502, 503, 504}
# Fields beyond the OpenAI API that vLLM and llama.cpp understand; a server that refuses them
# (400/422 naming one) gets requests without them from then on.
_EXTRA_FIELDS = ("top_k", "repetition_penalty", "min_tokens", "chat_template_kwargs")
_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u9fff\uf900-\ufaff]")


# A server may ask for a pause (429/503 with Retry-After); a live reply waits that long at
# most, beyond it the viewer is better served by the fallback now.
MAX_RETRY_AFTER_S = 30.0


class _Retryable(Exception):
    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _retry_after(headers: httpx.Headers) -> float | None:
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


class _ExtrasRefused(Exception):
    """The server rejects the non-standard sampling fields (top_k, repetition_penalty)."""


class OpenAIBackend:
    name = "openai"

    def __init__(self, config: OpenAIBackendConfig,
                 transport: httpx.AsyncBaseTransport | None = None) -> None:
        self._base_url = config.base_url.rstrip("/")
        self._model = config.model
        self._api_key = config.api_key.get_secret_value() if config.api_key else None
        self._timeout = config.timeout_s
        self._max_retries = config.max_retries
        self._extra_sampling = config.extra_sampling
        self._transport = transport
        self._client: httpx.AsyncClient | None = None
        self._in_flight: dict[str, asyncio.Task[Any] | None] = {}
        self.last_usage: dict[str, Any] | None = None
        self.last_finish_reason: str | None = None

    async def start(self) -> None:
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.AsyncClient(
            base_url=self._base_url, headers=headers, transport=self._transport,
            timeout=httpx.Timeout(self._timeout, connect=min(10.0, self._timeout)),
        )
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
            response = await self._client.get("/models")
            response.raise_for_status()
            data = response.json().get("data", [])
        except (httpx.HTTPError, ValueError) as exc:
            raise BackendUnavailableError(
                f"models.llm.openai.base_url: cannot reach {self._base_url}: "
                f"{type(exc).__name__}: {exc}") from None
        return [str(item.get("id")) for item in data if isinstance(item, dict)]

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        sampling = request.sampling
        body: dict[str, Any] = {
            "model": self._model,
            "messages": request.as_dicts(),
            "stream": True,
            "stream_options": {"include_usage": True},
            "max_tokens": sampling.max_new_tokens,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
        }
        if sampling.seed is not None:
            body["seed"] = sampling.seed
        if self._extra_sampling:  # vLLM / llama.cpp extensions; others ignore or refuse them
            body.update(top_k=sampling.top_k, repetition_penalty=sampling.repetition_penalty,
                        min_tokens=sampling.min_new_tokens,
                        # Qwen3-style templates: a thinking model would spend the whole
                        # budget thinking; live chat wants the answer.
                        chat_template_kwargs={"enable_thinking": False})
        return body

    async def generate(self, request: GenerationRequest) -> AsyncIterator[str]:
        if self._client is None:
            raise BackendUnavailableError("openai backend is not started")
        self._in_flight[request.request_id] = asyncio.current_task()
        try:
            attempt = 0
            while True:
                yielded = False
                try:
                    async for chunk in self._stream_once(request):
                        yielded = True
                        yield chunk
                    return
                except _ExtrasRefused:
                    log.info("%s refuses top_k/repetition_penalty/min_tokens; sending only "
                             "standard OpenAI sampling fields from now on", self._base_url)
                    self._extra_sampling = False
                    continue
                except _Retryable as exc:
                    wait = exc.retry_after_s
                    if (yielded or attempt == self._max_retries
                            or (wait is not None and wait > MAX_RETRY_AFTER_S)):
                        raise BackendUnavailableError(
                            f"{self._base_url}: {exc} (after {attempt + 1} attempt(s))"
                        ) from None
                    delay = wait if wait is not None else 0.5 * 2**attempt
                    attempt += 1
                    log.warning("openai backend: %s; retrying in %.1f s", exc, delay)
                    await asyncio.sleep(delay)
        finally:
            self._in_flight.pop(request.request_id, None)

    async def _stream_once(self, request: GenerationRequest) -> AsyncIterator[str]:
        assert self._client is not None
        try:
            async with self._client.stream("POST", "/chat/completions",
                                           json=self._body(request)) as response:
                if response.status_code in _RETRY_STATUS:
                    wait = _retry_after(response.headers)
                    raise _Retryable(f"HTTP {response.status_code}" + (
                        f", Retry-After {wait:.0f} s" if wait is not None else ""), wait)
                if response.status_code >= 400:
                    detail = (await response.aread()).decode("utf-8", "replace")[:300]
                    if (self._extra_sampling and response.status_code in (400, 422)
                            and any(f in detail for f in _EXTRA_FIELDS)):
                        raise _ExtrasRefused(detail)
                    raise EngineError(f"{self._base_url} refused the request: "
                                      f"HTTP {response.status_code}: {detail}")
                finished = False
                async for line in response.aiter_lines():
                    text, ended = self._parse_event(line)
                    finished = finished or ended
                    if text is None:
                        break
                    if text:
                        yield text
                if not finished:  # a cut connection must not pass for a complete reply
                    raise _Retryable("the stream ended before the reply finished")
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.RemoteProtocolError,
                httpx.ReadTimeout) as exc:
            raise _Retryable(f"{type(exc).__name__}: {exc}") from None

    def _parse_event(self, line: str) -> tuple[str | None, bool]:
        """(text of one SSE line, whether it ends the reply): "" for anything without text,
        None at ``[DONE]``; a ``finish_reason`` ends the reply too."""
        if not line.startswith("data:"):
            return "", False
        payload = line[5:].strip()
        if payload == "[DONE]":
            return None, True
        try:
            event = json.loads(payload)
        except json.JSONDecodeError:
            log.debug("ignoring a malformed stream event: %.80s", payload)
            return "", False
        if event.get("usage"):
            self.last_usage = event["usage"]
        choices = event.get("choices") or []
        if not choices:
            return "", False
        choice = choices[0]
        if choice.get("finish_reason"):
            self.last_finish_reason = choice["finish_reason"]
        return (choice.get("delta") or {}).get("content") or "", bool(choice.get("finish_reason"))

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

    def count_tokens(self, text: str) -> int:
        """An estimate (no tokenizer here): a CJK character ≈ 1 token, else ≈ 4 characters."""
        if not text:
            return 0
        cjk = len(_CJK.findall(text))
        return max(1, cjk + (len(text) - cjk) // 4)

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None
