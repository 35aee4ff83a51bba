"""The continuous decode loop's own duties: it hands its output to the event loop once per
pass, not once per token (each hand-over wakes the loop and then makes the worker thread wait
for the GIL), and a batch limit lowered by running out of memory comes back."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from engine.backends.transformers_backend import TransformersBackend
from engine.config import LLMConfig
from engine.types import ChatMessage, GenerationRequest, SamplingParams


async def test_a_batch_of_rows_wakes_the_event_loop_once_a_step(tiny_model_dir: Path) -> None:
    loop = asyncio.get_running_loop()
    wakeups = 0
    plain = loop.call_soon_threadsafe

    def counted(callback: Any, *args: Any, **kwargs: Any) -> Any:
        nonlocal wakeups
        wakeups += 1
        return plain(callback, *args, **kwargs)

    backend = TransformersBackend(LLMConfig(model_path=str(tiny_model_dir), device="cpu",
                                            continuous_batching="on"))
    await backend.start()
    requests = [GenerationRequest(
        (ChatMessage("user", f"hello there, how are you today? #{index}"),),
        SamplingParams(max_new_tokens=12, min_new_tokens=12, temperature=0.0))
        for index in range(6)]
    loop.call_soon_threadsafe = counted  # type: ignore[method-assign]
    try:
        replies = await asyncio.gather(*(_text(backend, request) for request in requests))
    finally:
        loop.call_soon_threadsafe = plain  # type: ignore[method-assign]
        await backend.close()
    worker = backend.continuous
    assert worker is not None and all(replies)
    passes = worker.steps + worker.timings["prefills"] + worker.timings["chunks"] + 1
    assert wakeups <= passes < 6 * 12  # per token it was one for each row's every token


async def _text(backend: TransformersBackend, request: GenerationRequest) -> str:
    return "".join([chunk async for chunk in backend.generate(request)])


async def test_a_batch_limit_lowered_by_an_oom_doubles_back_while_memory_holds(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.backends import continuous_worker

    monkeypatch.setattr(continuous_worker, "GROW_AFTER_STEPS", 4)
    backend = TransformersBackend(LLMConfig(model_path=str(tiny_model_dir), device="cpu",
                                            continuous_batching="on", max_batch_size=4))
    await backend.start()
    try:
        worker = backend.continuous
        assert worker is not None
        worker._shrink("a test")  # nothing runs: the limit drops to 1
        assert backend.max_batch_size == 1
        request = GenerationRequest((ChatMessage("user", "hello"),), SamplingParams(
            max_new_tokens=12, min_new_tokens=12, temperature=0.0))
        assert await _text(backend, request)  # 12 steps: 1 -> 2 -> 4, and no further
    finally:
        await backend.close()
    assert backend.max_batch_size == 4 and backend.batch_limit == 4


async def test_the_micro_batchers_lowered_limit_doubles_back_too(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.backends import micro_batch

    monkeypatch.setattr(micro_batch, "GROW_AFTER_BATCHES", 1)
    backend = TransformersBackend(LLMConfig(model_path=str(tiny_model_dir), device="cpu",
                                            continuous_batching="off", max_batch_size=4))
    await backend.start()
    try:
        backend.max_batch_size = 1  # as an out-of-memory retry leaves it
        for index in range(2):
            request = GenerationRequest((ChatMessage("user", f"hello {index}"),),
                                        SamplingParams(max_new_tokens=4, temperature=0.0))
            assert await _text(backend, request) is not None
    finally:
        await backend.close()
    assert backend.max_batch_size == 4
