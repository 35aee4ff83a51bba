"""The openai backend presses a model server only as hard as it can take: over capacity, it
sends fewer at once and every viewer is still answered; unreachable, it stops trying for a
while instead of retrying every message (and says so once)."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator

import pytest

from engine.backends.openai_backend import OpenAIBackend
from engine.backends.server_pace import CircuitBreaker, ConcurrencyLimit, jittered
from engine.config import OpenAIBackendConfig
from engine.errors import BackendUnavailableError
from engine.types import ChatMessage, GenerationRequest, SamplingParams
from tests.fake_openai import FakeOpenAI


def _request(index: int) -> GenerationRequest:
    return GenerationRequest((ChatMessage("user", f"hello #{index}"),),
                             SamplingParams(max_new_tokens=6))


async def _reply(backend: OpenAIBackend, index: int) -> str:
    return "".join([chunk async for chunk in backend.generate(_request(index))])


@pytest.fixture
async def small_server() -> AsyncIterator[FakeOpenAI]:
    server = FakeOpenAI()
    server.capacity, server.word_delay_s = 2, 0.01  # two at once, ~60 ms a reply
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def test_twenty_viewers_on_a_server_that_takes_two_are_all_answered(
        small_server: FakeOpenAI) -> None:
    backend = OpenAIBackend(OpenAIBackendConfig(base_url=small_server.base_url))
    await backend.start()
    try:
        replies = await asyncio.gather(*(_reply(backend, i) for i in range(20)))
    finally:
        await backend.close()
    assert all(replies) and small_server.answered == 20
    assert small_server.refused < 40  # refusals lowered the pace: no retry storm


async def test_an_unreachable_server_is_tried_a_few_times_not_once_per_message(
        small_server: FakeOpenAI, caplog: pytest.LogCaptureFixture) -> None:
    backend = OpenAIBackend(OpenAIBackendConfig(base_url=small_server.base_url))
    # A cooldown longer than the test, so a loaded machine cannot make it try again mid-way.
    backend._breaker = CircuitBreaker(cooldown_s=600)
    await backend.start()
    await small_server.stop()  # the model server goes away
    with socket.socket() as probe:  # nothing listens there now
        assert probe.connect_ex(("127.0.0.1", small_server.port)) != 0
    caplog.set_level(logging.INFO, logger="engine.backends.openai_backend")
    try:
        outcomes = await asyncio.gather(*(_reply(backend, i) for i in range(50)),
                                        return_exceptions=True)
    finally:
        await backend.close()
    assert all(isinstance(o, BackendUnavailableError) for o in outcomes)
    lines = [r for r in caplog.records
             if r.name == "engine.backends.openai_backend" and r.levelno >= logging.INFO]
    assert len(lines) <= 8, [r.getMessage() for r in lines]
    assert sum("unreachable" in r.getMessage() for r in lines if r.levelno >= logging.ERROR) == 1


async def test_the_limit_halves_once_per_burst_of_refusals_and_creeps_back() -> None:
    now = [0.0]
    limit = ConcurrencyLimit(8, clock=lambda: now[0])
    for _ in range(8):
        await limit.acquire()
    for _ in range(8):  # one burst sent under the old limit: one sign of overload
        await limit.release(refused=True)
    assert limit.limit == 4
    now[0] = 1.0
    await limit.acquire()
    await limit.release(refused=True)
    assert limit.limit == 2
    for _ in range(20):
        await limit.acquire()
        await limit.release()
    assert 2 < limit.limit <= 8


def test_the_breaker_opens_lets_one_try_through_and_closes_on_success() -> None:
    now = [0.0]
    breaker = CircuitBreaker(threshold=3, cooldown_s=2, clock=lambda: now[0])
    assert not any(breaker.failed() for _ in range(2)) and breaker.failed()
    assert breaker.retry_in_s() == 2
    now[0] = 2.5
    assert breaker.retry_in_s() is None  # the one try
    assert breaker.retry_in_s() == 0  # the others still wait for it
    assert breaker.failed() and breaker.retry_in_s() == 4  # failed: twice as long
    now[0] = 7.0
    assert breaker.retry_in_s() is None and breaker.succeeded()
    assert breaker.retry_in_s() is None and not breaker.is_open


def test_jitter_spreads_a_delay_around_itself() -> None:
    assert jittered(2.0, rng=lambda: 0.0) == 1.0 and jittered(2.0, rng=lambda: 0.999) < 3.0
