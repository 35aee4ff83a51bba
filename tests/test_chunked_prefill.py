"""Chunked prefill: a long prompt joins a chunk at a time between decode steps, the running
rows keep getting a token every step, and every reply is still what ``generate()`` gives."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.serving.continuous import ContinuousBatch, Joining

NEW_TOKENS = 10


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


def _alone(model: Any, ids: list[int]) -> list[int]:
    import torch

    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False)
    return [int(t) for t in out[0, len(ids):]]


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_long_prompt_joins_in_chunks_without_pausing_the_running_rows(
        model: Any, static: bool) -> None:
    persona = list(range(5, 45))
    running = [*persona, *range(100, 130)]
    long = [*persona, *range(200, 300)]  # 100 tokens past the persona: 7 chunks of 16
    batch = ContinuousBatch(model, slots=4)
    if static:
        batch.make_static(slots=4, width=256)
    batch.set_prefix(persona)
    batch.join("running", running, NEW_TOKENS, frozenset())
    chunked = batch.prefiller.begin(Joining("long", long, NEW_TOKENS, frozenset()))
    assert chunked.start == len(persona)
    tokens_between_steps, done = [], False
    while not done:
        before = chunked.done
        done = batch.prefiller.advance(chunked, 16)
        tokens_between_steps.append(chunked.done - before)
        stepped = batch.size
        batch.step()  # the running row gets its next token after every chunk
        assert len(batch.rows[0].tokens) == len(tokens_between_steps) + 1 or stepped == 0
    assert max(tokens_between_steps) <= 16 and sum(tokens_between_steps) == 100
    batch.join_chunked(chunked)
    assert batch.last_cached == [len(persona)]
    results: dict[str, list[int]] = {}
    while batch.size:
        batch.step()
        done_rows = batch.finished()
        results.update({row.request_id: list(row.tokens) for row in done_rows})
        batch.leave({row.request_id for row in done_rows})
    assert results == {"running": _alone(model, running), "long": _alone(model, long)}


async def test_the_backend_chunks_a_long_prompt_and_answers_as_without(
        tiny_model_dir: Path) -> None:
    """Through the in-process backend: a long prompt arriving while a reply decodes is
    prefilled in chunks (counted); the greedy replies equal those of whole-prompt prefill."""
    import asyncio

    from engine.backends.transformers_backend import TransformersBackend
    from engine.config import LLMConfig
    from engine.types import ChatMessage, GenerationRequest, SamplingParams

    def request(text: str, tokens: int) -> GenerationRequest:
        return GenerationRequest(
            (ChatMessage("system", "You draw star maps."), ChatMessage("user", text)),
            SamplingParams(max_new_tokens=tokens, min_new_tokens=tokens, temperature=0.0))

    async def reply(backend: TransformersBackend, req: GenerationRequest) -> str:
        return "".join([chunk async for chunk in backend.generate(req)])

    async def answers(chunk: int) -> tuple[list[str], float]:
        backend = TransformersBackend(LLMConfig(
            model_path=str(tiny_model_dir), device="cpu", continuous_batching="on",
            prefill_chunk_tokens=chunk, prefix_cache_gb=0))
        await backend.start()
        try:
            stream = backend.generate(request("hello there", 40))
            pieces = [await anext(stream)]  # the first reply is decoding now
            long = asyncio.create_task(reply(backend, request("the stars tonight " * 40, 8)))
            pieces += [chunk async for chunk in stream]
            texts = ["".join(pieces), await long]
        finally:
            await backend.close()
        assert backend.continuous is not None
        return texts, backend.continuous.timings["chunks"]

    chunked, chunks = await answers(64)
    whole, none = await answers(0)
    assert chunks >= 2 and none == 0
    assert chunked == whole
