"""The model and its decode loop in an engine process of their own (``llm.engine_process``):
the same replies as in the runtime's process, a consumer that leaves stops its row, an engine
process that dies fails its requests with the reason and is started again, a start-up error
is raised from ``start`` as in-process, Ctrl-C is the runtime's to act on, and the engine's
log lines reach the runtime's handlers."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

import pytest

from engine.backends import create_backend, process_backend
from engine.backends.process_backend import ProcessBackend
from engine.backends.transformers_backend import TransformersBackend
from engine.config import LLMConfig
from engine.errors import BackendUnavailableError, ModelNotFoundError
from engine.types import ChatMessage, GenerationRequest, SamplingParams

PROMPTS = ["hello there", "你好，今天的星星很亮喔～", "good night and see you tomorrow"]


def _config(model_dir: Path, engine_process: str = "on") -> LLMConfig:
    return LLMConfig(model_path=str(model_dir), device="cpu", continuous_batching="on",
                     engine_process=engine_process)


def _request(text: str, tokens: int = 12, request_id: str | None = None) -> GenerationRequest:
    request = GenerationRequest((ChatMessage("user", text),), SamplingParams(
        max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0))
    return request if request_id is None else GenerationRequest(
        request.messages, request.sampling, request_id=request_id)


async def _text(backend: TransformersBackend | ProcessBackend,
                request: GenerationRequest) -> str:
    return "".join([chunk async for chunk in backend.generate(request)])


async def test_an_engine_process_replies_as_the_runtimes_own_process_does(
        tiny_model_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    in_process = TransformersBackend(_config(tiny_model_dir, engine_process="off"))
    await in_process.start()
    try:
        expected = [await _text(in_process, _request(text)) for text in PROMPTS]
    finally:
        await in_process.close()

    backend = create_backend(_config(tiny_model_dir))
    assert isinstance(backend, ProcessBackend)
    await backend.start()
    try:
        requests = [_request(text) for text in PROMPTS]
        replies = await asyncio.gather(*(_text(backend, request) for request in requests))
        health = await backend.fresh_health()
        usage = backend.prompt_usage(requests[0].request_id)
        info = backend.info()
    finally:
        await backend.close()
    assert list(replies) == expected
    assert usage is not None and usage.prompt_tokens > 0
    assert usage.completion_tokens == 12  # counted where they were made
    assert health["ok"] and health["timings"]["steps"] > 0
    assert info["engine_process"] != os.getpid() and info["model_dir"]
    # /diagnose's layer map comes from the engine process, where the model is.
    assert info["allocation"]["layer_map"] and info["allocation"]["placement"]
    assert backend.count_tokens("hello there") > 0
    # The engine's start-up lines were written by this process's handlers.
    assert any(record.name == "engine.backends.transformers_backend"
               and "LLM loaded" in record.getMessage() for record in caplog.records)


async def test_a_consumer_that_leaves_stops_its_row_and_ctrl_c_is_the_runtimes(
        tiny_model_dir: Path) -> None:
    backend = ProcessBackend(_config(tiny_model_dir))
    await backend.start()
    try:
        engine_pid = backend.info()["engine_process"]
        os.kill(engine_pid, signal.SIGINT)  # as Ctrl-C reaches the whole process group
        stream = backend.generate(_request("tell me a long story", tokens=400))
        assert await anext(stream)
        await stream.aclose()  # the viewer's answer was given up on
        assert await _text(backend, _request("hello again"))
        health = await backend.fresh_health()
    finally:
        await backend.close()
    assert health["ok"] and health["engine_pid"] == engine_pid
    # The left row stopped long before its 400 tokens: the two replies took fewer steps.
    assert health["timings"]["steps"] < 400


async def test_an_engine_process_that_dies_fails_its_requests_and_starts_again(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(process_backend, "RESTART_PAUSES_S", (0.0,))
    backend = ProcessBackend(_config(tiny_model_dir))
    await backend.start()
    try:
        first_pid = backend.info()["engine_process"]
        stream = backend.generate(_request("tell me a long story", tokens=400))
        assert await anext(stream)
        os.kill(first_pid, signal.SIGKILL)
        with pytest.raises(BackendUnavailableError, match="exited"):
            async for _chunk in stream:
                pass
        assert not backend.health()["ok"]
        with pytest.raises(BackendUnavailableError):
            await _text(backend, _request("hello"))  # refused at once while it restarts
        assert backend._restarts is not None
        await backend._restarts
        assert backend.health()["ok"] and backend.info()["engine_process"] != first_pid
        assert await _text(backend, _request("hello again"))
    finally:
        await backend.close()


async def test_a_start_up_error_is_raised_from_start_as_in_process(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    errors = []
    for backend in (TransformersBackend(_config(missing, engine_process="off")),
                    ProcessBackend(_config(missing))):
        with pytest.raises(ModelNotFoundError) as raised:
            await backend.start()
        errors.append(str(raised.value))
        await backend.close()
    assert errors[0] == errors[1]
