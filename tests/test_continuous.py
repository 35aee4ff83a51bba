"""Continuous batching on CPU with the tiny Qwen3: greedy output is token-identical to
``generate()`` on each prompt alone, whoever joins or leaves mid-flight."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from engine.serving.continuous import ContinuousBatch, Joining, supports

PROMPTS = ["hello there, how are you today?", "你好，今天的星星很亮喔～",
           "The lighthouse keeper draws maps of the stars. What does she draw?",
           "good night"]
NEW_TOKENS = 12


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> tuple[Any, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(tiny_model_dir)


def _alone(model: Any, ids: list[int]) -> list[int]:
    import torch

    out = model.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, do_sample=False)
    return [int(t) for t in out[0, len(ids):]]


def _drive(batch: ContinuousBatch, arrivals: dict[int, list[tuple[str, list[int]]]],
           cancel: dict[int, str] | None = None) -> dict[str, list[int]]:
    """Run steps; at step N, the requests in ``arrivals[N]`` join (and ``cancel[N]``
    leaves); finished rows leave after every step. Returns each request's tokens."""
    results: dict[str, list[int]] = {}
    step = 0
    while step <= max(arrivals) or batch.size:
        for request_id, ids in arrivals.get(step, []):
            batch.join(request_id, ids, NEW_TOKENS, frozenset())
        if cancel and step in cancel:
            batch.leave({cancel[step]})
        batch.step()
        done = batch.finished()
        for row in done:
            results[row.request_id] = list(row.tokens)
        batch.leave({row.request_id for row in done})
        step += 1
    return results


def test_the_tiny_model_qualifies(tiny: tuple[Any, Any]) -> None:
    assert supports(tiny[0])


@pytest.fixture(params=[False, True], ids=["step-by-step", "pipelined"])
def pipelined(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both ways of stepping: each step's tokens read before the next is launched, or one
    step behind (what a GPU does: a row that finished is stepped once more)."""
    monkeypatch.setattr(ContinuousBatch, "pipelined", request.param)
    return bool(request.param)


def test_staggered_arrivals_match_generate_token_for_token(tiny: tuple[Any, Any],
                                                           pipelined: bool) -> None:
    model, tokenizer = tiny
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    expected = {f"r{i}": _alone(model, prompt) for i, prompt in enumerate(ids)}
    arrivals = {0: [("r0", ids[0])], 3: [("r1", ids[1])], 4: [("r2", ids[2])],
                9: [("r3", ids[3])]}
    assert _drive(ContinuousBatch(model), arrivals) == expected


def test_a_row_joining_does_not_change_the_others(tiny: tuple[Any, Any],
                                                  pipelined: bool) -> None:
    model, tokenizer = tiny
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    alone = _drive(ContinuousBatch(model), {0: [("a", ids[2])]})
    crowded = _drive(ContinuousBatch(model), {0: [("a", ids[2])], 2: [("b", ids[0])],
                                              5: [("c", ids[1]), ("d", ids[3])]})
    assert crowded["a"] == alone["a"]


def test_a_cancelled_row_frees_its_slot_at_once(tiny: tuple[Any, Any]) -> None:
    model, tokenizer = tiny
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    batch = ContinuousBatch(model)
    batch.join("long", ids[2], NEW_TOKENS, frozenset())
    batch.join("short", ids[3], NEW_TOKENS, frozenset())
    batch.step()
    batch.leave({"long"})
    assert [row.request_id for row in batch.rows] == ["short"]
    slots = batch._cache
    assert slots is not None and slots.rows == 1
    batch.join("next", ids[0], NEW_TOKENS, frozenset())  # takes the freed slot
    assert batch._cache is slots and slots.rows == 2
    results = _drive(batch, {0: []})
    assert results["short"] == _alone(model, ids[3])
    assert results["next"] == _alone(model, ids[0])


def test_a_long_running_batch_reclaims_columns_and_grows_its_slots(
        tiny: tuple[Any, Any]) -> None:
    """Rows keep arriving for longer than the slots are wide (the columns no row needs are
    cut from the left), and more rows than the first allocation run at once (it grows):
    every reply is still what ``generate()`` gives alone."""
    model, tokenizer = tiny
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    batch = ContinuousBatch(model, slots=1)
    arrivals = {step: [(f"r{step}", ids[step % len(ids)])] for step in range(0, 300, 3)}
    results = _drive(batch, arrivals)
    expected = {i: _alone(model, prompt) for i, prompt in enumerate(ids)}
    assert results == {f"r{step}": expected[step % len(ids)] for step in range(0, 300, 3)}
    assert batch._cache is not None
    assert batch._cache.slots >= 4 and batch._cache.width < 300


def test_a_shared_prefix_is_prefilled_once_and_changes_nothing(tiny: tuple[Any, Any]) -> None:
    """The persona's system prompt: its KV is computed once and copied into every request
    that starts with it; output stays token-identical; dropping it (persona changed) works."""
    model, tokenizer = tiny
    system = tokenizer.encode("system user assistant good night see you tomorrow",
                              add_special_tokens=False)
    ids = [system + tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    expected = {f"r{i}": _alone(model, prompt) for i, prompt in enumerate(ids)}
    batch = ContinuousBatch(model)
    batch.set_prefix(system)
    arrivals = {0: [("r0", ids[0])], 2: [("r1", ids[1]), ("r2", ids[2])], 6: [("r3", ids[3])]}
    assert _drive(batch, arrivals) == expected
    assert batch.prefix_hits == 4
    batch.set_prefix([])  # invalidated: a new persona
    other = tokenizer.encode("hello there", add_special_tokens=False)
    assert _drive(batch, {0: [("x", other)]}) == {"x": _alone(model, other)}
    assert batch.prefix_hits == 4


async def test_the_backend_answers_concurrent_requests_through_the_continuous_loop(
        tiny_model_dir: Path, pipelined: bool) -> None:
    """The backend in continuous mode, CPU: greedy replies equal the micro-batcher's, rows
    joining mid-flight included."""
    import asyncio

    from engine.backends.transformers_backend import TransformersBackend
    from engine.config import LLMConfig
    from engine.types import ChatMessage, GenerationRequest, SamplingParams

    def request(text: str, **sampling: Any) -> GenerationRequest:
        params = SamplingParams(max_new_tokens=10, temperature=0.0, **sampling)
        return GenerationRequest(messages=(ChatMessage("system", "You draw star maps."),
                                           ChatMessage("user", text)), sampling=params)

    async def reply(backend: TransformersBackend, req: GenerationRequest,
                    delay: float = 0.0) -> str:
        await asyncio.sleep(delay)
        return "".join([chunk async for chunk in backend.generate(req)])

    async def answers(mode: str) -> tuple[list[str], TransformersBackend]:
        backend = TransformersBackend(LLMConfig(model_path=str(tiny_model_dir), device="cpu",
                                                continuous_batching=mode))
        await backend.start()
        try:
            texts = await asyncio.gather(*(reply(backend, request(p), 0.02 * i)
                                           for i, p in enumerate(PROMPTS)))
        finally:
            await backend.close()
        return list(texts), backend

    continuous, backend = await answers("on")
    assert backend.continuous is not None and backend.continuous.steps > 0
    batched, plain = await answers("off")
    assert plain.continuous is None
    assert continuous == batched


async def test_cancel_frees_the_row_and_a_seed_repeats_a_sampled_reply(
        tiny_model_dir: Path, pipelined: bool) -> None:
    import asyncio

    from engine.backends.transformers_backend import TransformersBackend
    from engine.config import LLMConfig
    from engine.types import ChatMessage, GenerationRequest, SamplingParams

    backend = TransformersBackend(LLMConfig(model_path=str(tiny_model_dir), device="cpu",
                                            continuous_batching="on"))
    await backend.start()
    try:
        def request(**sampling: Any) -> GenerationRequest:
            return GenerationRequest(messages=(ChatMessage("user", "hello there"),),
                                     sampling=SamplingParams(**sampling))

        stream = backend.generate(request(max_new_tokens=400, min_new_tokens=400))
        await anext(stream)  # the first text arrived: the row is running
        await stream.aclose()  # the viewer's request was cancelled
        worker = backend.continuous
        assert worker is not None
        for _ in range(200):
            if not worker._running:
                break
            await asyncio.sleep(0.01)
        assert not worker._running and worker._batch.size == 0
        seeded = request(max_new_tokens=12, temperature=0.9, top_k=20, seed=7)
        first = "".join([c async for c in backend.generate(seeded)])
        again = "".join([c async for c in backend.generate(seeded)])
        assert first == again and first
    finally:
        await backend.close()


def _greedy(text: str) -> Any:
    from engine.types import ChatMessage, GenerationRequest, SamplingParams

    return GenerationRequest(messages=(ChatMessage("user", text),),
                             sampling=SamplingParams(max_new_tokens=8, temperature=0.0))


async def _answers_with_injected_join(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                      fails: Any, group: int) -> tuple[Any, list[str],
                                                                       list[str], list[int]]:
    """Replies to PROMPTS alone, then all at once while ``fails(batch, joining)`` makes one
    join run out of memory; the backend, both sets of replies and what was injected."""
    import asyncio

    import torch

    from engine.backends import continuous_worker
    from engine.backends.transformers_backend import TransformersBackend
    from engine.config import LLMConfig

    backend = TransformersBackend(LLMConfig(model_path=str(tiny_model_dir), device="cpu",
                                            continuous_batching="on"))
    await backend.start()
    try:
        async def reply(text: str) -> str:
            return "".join([c async for c in backend.generate(_greedy(text))])

        expected = [await reply(text) for text in PROMPTS]
        worker = backend.continuous
        assert worker is not None
        real_join = worker._batch.join_many
        injected: list[int] = []

        def tight_join(joining: list[Any]) -> list[int]:
            if fails(worker._batch, joining) and not injected:
                injected.append(len(joining))
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            return real_join(joining)

        monkeypatch.setattr(continuous_worker, "JOIN_GROUP", group)
        monkeypatch.setattr(continuous_worker, "IDLE_JOIN_GROUP", group)
        monkeypatch.setattr(worker._batch, "join_many", tight_join)
        answers = await asyncio.gather(*(reply(text) for text in PROMPTS))
    finally:
        await backend.close()
    return backend, expected, list(answers), injected


async def test_out_of_memory_while_joining_halves_the_limit_and_answers_everyone(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend, expected, answers, injected = await _answers_with_injected_join(
        tiny_model_dir, monkeypatch, lambda batch, _joining: batch.size >= 2, group=1)
    assert answers == expected and injected
    assert backend.oom_retries == 1 and backend.max_batch_size == 1


async def test_a_group_too_large_to_prefill_joins_in_halves(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing running holds the memory: the group's prefill was too big. It splits, and
    everyone is answered without lowering the batch limit. (Injected only into a join with
    no row running: on a busy machine the first request may join alone before the others
    arrive, and an out-of-memory beside running rows lowers the limit, as it should.)"""
    backend, expected, answers, injected = await _answers_with_injected_join(
        tiny_model_dir, monkeypatch,
        lambda batch, joining: len(joining) > 1 and batch.size == 0, group=8)
    assert answers == expected
    assert backend.max_batch_size == 8 and backend.oom_retries == 0
    assert not injected or injected[0] > 1


def test_prompts_sharing_only_the_start_of_the_prefix_reuse_that_part(
        tiny: tuple[Any, Any]) -> None:
    """Per-viewer system turns (the persona, then a mood hint that differs): the shared
    persona part comes from the cache, the rest is prefilled, output stays identical."""
    model, tokenizer = tiny
    persona = tokenizer.encode("The lighthouse keeper draws maps of the stars. " * 3,
                               add_special_tokens=False)
    hints = ["good night", "hello there, how are you today?"]
    ids = [persona + tokenizer.encode(h, add_special_tokens=False) for h in hints]
    expected = {f"r{i}": _alone(model, prompt) for i, prompt in enumerate(ids)}
    batch = ContinuousBatch(model)
    batch.set_prefix(ids[0])  # the first viewer's whole system turn
    assert _drive(batch, {0: [("r0", ids[0])], 1: [("r1", ids[1])]}) == expected
    assert batch.prefix_hits == 2


def test_static_slots_with_bucketed_steps_match_generate(tiny: tuple[Any, Any],
                                                          pipelined: bool) -> None:
    """The static-shape decode step (what is captured as CUDA graphs on a GPU), run eagerly:
    fixed slots, a bucket's idle rows computed alongside, columns cut when the narrow slots
    fill up; every reply is still what ``generate()`` gives alone."""
    model, tokenizer = tiny
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    batch = ContinuousBatch(model, slots=4)
    batch.make_static(slots=4, width=64)
    assert batch.static and not batch.captured
    arrivals = {step: [(f"r{step}", ids[step % len(ids)])] for step in range(0, 90, 3)}
    results = _drive(batch, arrivals)
    expected = {i: _alone(model, prompt) for i, prompt in enumerate(ids)}
    assert results == {f"r{step}": expected[step % len(ids)] for step in range(0, 90, 3)}
    assert batch._cache is not None and batch._cache.width == 64  # never grew


def test_the_forwards_graphs_capture_leave_the_step_inputs_to_the_host(
        tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """On a GPU the static decode step and the small prefill are captured once and replayed:
    anything their forward does is done again at every replay with the values of capture
    time. Setting the write column in there (as ``use_full_width`` did) made every replayed
    step write column 0, and replies diverged from ``generate()`` on the GPU only. The slots
    must be synced by the host, outside the forwards (and syncing them while a capture runs
    raises)."""
    from engine.serving.decode_graphs import DecodeGraphs
    from engine.serving.kv_slots import SlotCache
    from engine.serving.prefill_graphs import PrefillGraphs

    inside: list[str] = []
    synced_inside: list[str] = []
    ran: set[str] = set()

    def watched(cls: Any) -> Any:
        own = cls._forward

        def forward(graphs: Any, *args: Any) -> Any:
            inside.append(cls.__name__)
            ran.add(cls.__name__)
            try:
                return own(graphs, *args)
            finally:
                inside.pop()
        return forward

    own_sync = SlotCache._sync

    def sync(cache: SlotCache) -> None:
        synced_inside.extend(inside)
        own_sync(cache)

    for cls in (DecodeGraphs, PrefillGraphs):
        monkeypatch.setattr(cls, "_forward", watched(cls))
    monkeypatch.setattr(SlotCache, "_sync", sync)
    model, tokenizer = tiny
    system = tokenizer.encode("system user assistant good night", add_special_tokens=False)
    prompt = system + tokenizer.encode(PROMPTS[0], add_special_tokens=False)
    batch = ContinuousBatch(model, slots=4)
    batch.make_static(slots=4, width=64)
    batch.set_prefix(system)
    assert _drive(batch, {0: [("r0", prompt)]}) == {"r0": _alone(model, prompt)}
    assert ran == {"DecodeGraphs", "PrefillGraphs"}  # both were exercised
    assert synced_inside == []


@pytest.mark.parametrize("with_prefix", [False, True])
@pytest.mark.parametrize("pack_tokens", [4096, 12], ids=["one pack", "several packs"])
def test_requests_prefilled_together_match_generate(tiny: tuple[Any, Any], with_prefix: bool,
                                                    pack_tokens: int,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests that arrived during one step join together, their prompts packed into one
    sequence (or several, past ``PACK_TOKENS``) beside a row already running; each still
    gets what ``generate()`` gives alone."""
    from engine.serving import packed_prefill

    monkeypatch.setattr(packed_prefill, "PACK_TOKENS", pack_tokens)
    model, tokenizer = tiny
    system = tokenizer.encode("system user assistant good night", add_special_tokens=False)
    ids = [(system if with_prefix else []) + tokenizer.encode(p, add_special_tokens=False)
           for p in PROMPTS]
    batch = ContinuousBatch(model)
    if with_prefix:
        batch.set_prefix(system)
    batch.join("first", ids[0], NEW_TOKENS, frozenset())
    batch.step()
    batch.join_many([Joining(f"r{i}", prompt, NEW_TOKENS, frozenset())
                     for i, prompt in enumerate(ids[1:], start=1)])
    results = _drive(batch, {0: []})
    assert results == {"first": _alone(model, ids[0]),
                       **{f"r{i}": _alone(model, ids[i]) for i in range(1, len(ids))}}
    assert batch.prefix_hits == (len(ids) if with_prefix else 0)


def test_a_static_single_join_past_a_partly_shared_prefix_matches_generate(
        tiny: tuple[Any, Any]) -> None:
    """With static slots a single arrival is prefilled by the static-shape path (captured as
    CUDA graphs on a GPU, eager here): its tokens padded to a bucket, attending to the prefix
    columns it shares (the rest of the prefix masked) and causally to each other. Viewers
    whose mood hints differ share different lengths of the prefix; every reply is still
    what ``generate()`` gives alone."""
    model, tokenizer = tiny
    persona = tokenizer.encode("The lighthouse keeper draws maps of the stars. " * 3,
                               add_special_tokens=False)
    hints = ["good night", "hello there, how are you today?", "maps"]
    ids = [persona + tokenizer.encode(h, add_special_tokens=False) for h in hints]
    batch = ContinuousBatch(model, slots=4)
    batch.make_static(slots=4, width=128)
    batch.set_prefix(ids[1])  # one viewer's whole system turn: the others share less of it
    prefill = batch.prefiller.graphs
    assert prefill is not None
    shared: list[int] = []
    static_run = prefill.run

    def run(rests: list[list[int]], covered: int) -> Any:
        shared.append(covered)
        return static_run(rests, covered)

    prefill.run = run  # type: ignore[method-assign]
    order = [0, 1, 2, 2, 0, 1]
    arrivals = {3 * n: [(f"r{n}", ids[which])] for n, which in enumerate(order)}
    results = _drive(batch, arrivals)
    expected = [_alone(model, prompt) for prompt in ids]
    assert results == {f"r{n}": expected[which] for n, which in enumerate(order)}
    assert len(shared) == len(order) and len(set(shared)) > 1  # every join, varied sharing


def test_a_static_group_join_matches_generate(tiny: tuple[Any, Any]) -> None:
    """Requests arriving together take the static prefill too (rows and tokens padded to a
    bucket: 3 requests run in the 4-row bucket, prompts of different lengths); each still
    gets what ``generate()`` gives alone, and those already running are undisturbed."""
    model, tokenizer = tiny
    system = tokenizer.encode("system user assistant good night", add_special_tokens=False)
    ids = [system + tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS]
    batch = ContinuousBatch(model, slots=8)
    batch.make_static(slots=8, width=128)
    batch.set_prefix(system)
    batch.join("first", ids[0], NEW_TOKENS, frozenset())
    batch.step()
    batch.join_many([Joining(f"r{i}", prompt, NEW_TOKENS, frozenset())
                     for i, prompt in enumerate(ids[1:4], start=1)])
    results = _drive(batch, {0: []})
    assert results == {"first": _alone(model, ids[0]),
                       **{f"r{i}": _alone(model, ids[i]) for i in range(1, 4)}}
    assert batch.prefix_hits == 4


def test_compiling_the_decode_step_leaves_the_model_as_it_was(tiny: tuple[Any, Any]) -> None:
    """While a bucket is captured compiled (a GPU), the model runs the compiled forward with
    grouped-head attention, kept out of the compiled code above one row; afterwards the
    model's forward and the attention registry are its own again (prefills run them
    eagerly)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from engine.serving.decode_attention import grouped_decode_attention
    from engine.serving.decode_graphs import FULLY_COMPILED_ROWS

    model, _ = tiny
    batch = ContinuousBatch(model, slots=4)
    batch.make_static(slots=4, width=64)
    graphs = batch._graphs
    assert graphs is not None
    name = model.config._attn_implementation
    attention = ALL_ATTENTION_FUNCTIONS[name]
    compiled = object()
    with graphs._compiled(compiled, FULLY_COMPILED_ROWS + 1):
        assert model.forward is compiled
        assert ALL_ATTENTION_FUNCTIONS[name] is not attention  # kept out of the compiled code
    assert "forward" not in model.__dict__ and ALL_ATTENTION_FUNCTIONS[name] is attention
    with graphs._compiled(compiled, FULLY_COMPILED_ROWS):
        assert ALL_ATTENTION_FUNCTIONS[name] is grouped_decode_attention  # compiled along
    assert ALL_ATTENTION_FUNCTIONS[name] is attention
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("rows", [1, 3])
def test_an_uncompiled_bucket_captures_packed_head_attention(tiny: tuple[Any, Any],
                                                             rows: int) -> None:
    """Without compiling, a bucket still attends with the KV heads as stored (whatever the
    installed transformers does for a decode step), and decodes like ``generate()``; the
    registry is transformers' own again afterwards."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from engine.serving.decode_attention import packed_decode_attention

    model, tokenizer = tiny
    attention = ALL_ATTENTION_FUNCTIONS["sdpa"]
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:rows]]
    batch = ContinuousBatch(model, slots=4)
    batch.make_static(slots=4, width=128)
    graphs = batch._graphs
    assert graphs is not None
    with graphs._compiled(None, rows):
        assert ALL_ATTENTION_FUNCTIONS["sdpa"] is packed_decode_attention
        assert "forward" not in model.__dict__
        results = _drive(batch, {0: [(f"r{i}", prompt) for i, prompt in enumerate(ids)]})
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is attention
    assert results == {f"r{i}": _alone(model, prompt) for i, prompt in enumerate(ids)}


@pytest.mark.parametrize("rows", [1, 3])
def test_the_step_attention_of_a_compiled_bucket_gives_the_tokens_of_generate(
        tiny: tuple[Any, Any], rows: int) -> None:
    """What a compiled bucket captures (grouped-head attention; here run eagerly) decodes
    token for token like ``generate()``."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from engine.serving.decode_attention import grouped_decode_attention

    model, tokenizer = tiny
    assert model.config._attn_implementation == "sdpa"
    ids = [tokenizer.encode(p, add_special_tokens=False) for p in PROMPTS[:rows]]
    batch = ContinuousBatch(model, slots=4)
    batch.make_static(slots=4, width=128)
    graphs = batch._graphs
    assert graphs is not None
    with graphs._compiled(model.forward, rows):
        assert (ALL_ATTENTION_FUNCTIONS["sdpa"] is grouped_decode_attention) == (rows == 1)
        results = _drive(batch, {0: [(f"r{i}", prompt) for i, prompt in enumerate(ids)]})
    assert results == {f"r{i}": _alone(model, prompt) for i, prompt in enumerate(ids)}


def test_pipelined_steps_count_the_pending_token_for_penalties_and_minimum_length(
        tiny: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A row one step behind still knows how many tokens it has: the end is allowed from
    ``min_new_tokens`` on, exactly as when every step is read before the next."""
    from engine.types import SamplingParams

    model, tokenizer = tiny
    ids = tokenizer.encode(PROMPTS[1], add_special_tokens=False)
    params = SamplingParams(max_new_tokens=NEW_TOKENS, min_new_tokens=5, temperature=0.0,
                            repetition_penalty=1.3)

    def run(pipelined: bool, eos: frozenset[int]) -> list[int]:
        monkeypatch.setattr(ContinuousBatch, "pipelined", pipelined)
        batch = ContinuousBatch(model)
        batch.join("a", ids, NEW_TOKENS, eos, params)
        while not batch.finished():
            batch.step()
        return list(batch.rows[0].tokens)

    free = run(False, frozenset())
    eos = frozenset({free[5]})  # the sixth token, the first one allowed to end the reply
    assert eos.isdisjoint(free[:5])
    step_by_step = run(False, eos)
    assert step_by_step == free[:6]
    assert run(True, eos) == step_by_step


def test_a_burst_joins_in_one_prefill_when_nothing_runs() -> None:
    """A join pauses the running rows, so while rows run a prefill takes ``JOIN_GROUP`` at
    most; with none running nobody waits, and everyone waiting joins in one pass."""
    import queue
    import threading
    from types import SimpleNamespace

    from engine.backends.continuous_worker import JOIN_GROUP, ContinuousWorker
    from engine.backends.jobs import Job
    from engine.types import ChatMessage, GenerationRequest

    class Model:
        def forward(self, input_ids: Any, logits_to_keep: int = 0) -> None: ...

    backend = SimpleNamespace(model=Model(), max_batch_size=32, eos_ids=frozenset,
                              prefix_cache_bytes=0, prefill_chunk_tokens=0)
    worker = ContinuousWorker(backend, queue.Queue())  # type: ignore[arg-type]
    joined: list[int] = []

    def join(group: list[Job]) -> None:
        joined.append(len(group))
        worker._running.update({job.request.request_id: job for job in group})

    worker._join = join  # type: ignore[method-assign]

    def waiting(count: int) -> list[Job]:
        return [Job(GenerationRequest((ChatMessage("user", "hi"),)), lambda _: None,
                    threading.Event()) for _ in range(count)]

    worker._waiting.extend(waiting(20))
    worker._admit()
    assert joined == [20]
    worker._waiting.extend(waiting(20))
    worker._admit()  # 12 slots left, taken JOIN_GROUP at a time beside the running rows
    assert joined == [20, JOIN_GROUP, 12 - JOIN_GROUP] and len(worker._waiting) == 8
