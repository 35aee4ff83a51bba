"""Prompts laid out for prefix reuse: the persona first and the same for every viewer, a
viewer's history next and the same between their messages, what changes last."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from pathlib import Path

import pytest

from bot.history_window import HistoryWindows
from engine.backends.prompts import ChatPrompts
from engine.persona import PersonaState, load_persona, state_hint
from engine.response_generator import build_messages
from engine.types import ChatMessage, GenerationRequest, SamplingParams

PERSONA = load_persona()


@dataclass(frozen=True)
class Msg:
    id: int
    role: str
    content: str


def _chat(turns: int, first_id: int = 1) -> list[Msg]:
    return [Msg(first_id + i, "user" if i % 2 == 0 else "assistant", f"message {i} " + "x" * 8)
            for i in range(2 * turns)]


def _tokens(text: str) -> int:
    return len(text)


def test_the_system_turn_is_the_same_for_viewers_with_different_state_and_history() -> None:
    ann = build_messages(PERSONA.system_prompt("zh"), "你好", [("user", "我養貓"),
                                                               ("assistant", "好可愛")],
                         context="- 燈塔在北邊", user_notes=["我的貓叫 Mochi"],
                         state_hint=state_hint(PersonaState("happy", intimacy=80), PERSONA))
    bob = build_messages(PERSONA.system_prompt("zh"), "嗨", (),
                         state_hint=state_hint(PersonaState("sad"), PERSONA))
    assert ann[0] == bob[0] == ChatMessage("system", PERSONA.system_prompt("zh"))
    # What changes with every message comes after the history.
    assert [m.role for m in ann] == ["system", "user", "assistant", "system", "user", "user"]
    assert "Mochi" in ann[-2].content and "燈塔" in ann[-3].content


def test_a_viewers_window_keeps_its_start_while_it_fits_then_moves_to_the_newest_half() -> None:
    windows = HistoryWindows(token_budget=20 * 17, count_tokens=_tokens)
    starts = []
    for turns in range(1, 30):
        read = _chat(turns)[-20:]  # the store reads the newest 20 messages
        kept = windows.window(7, read)
        assert kept == read[-len(kept):]  # the newest, contiguous
        assert kept[0].role == "user"
        starts.append(kept[0].id)
    # The start moved only a few times, each time by a whole half window.
    moves = [b - a for a, b in itertools.pairwise(starts) if b != a]
    assert 0 < len(moves) <= 4 and all(move >= 8 for move in moves)


def test_a_window_past_the_token_budget_moves_on() -> None:
    windows = HistoryWindows(token_budget=100, count_tokens=_tokens)
    first = windows.window(1, _chat(2))
    assert first[0].id == 1
    longer = windows.window(1, _chat(4))  # 8 messages of 17 tokens: over 100
    assert sum(len(m.content) for m in longer) <= 50 and longer[0].role == "user"
    assert windows.window(2, _chat(1)) == _chat(1)  # each viewer has their own


def test_a_template_without_later_system_turns_gets_them_folded(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'system' and not loop.first %}"
        "{{ raise_exception('System role only at the start') }}{% endif %}"
        "<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    request = GenerationRequest(
        (ChatMessage("system", "persona"), ChatMessage("user", "hi"),
         ChatMessage("system", "mood: happy"), ChatMessage("user", "again")),
        SamplingParams(max_new_tokens=8))
    text = tokenizer.decode(ChatPrompts(tokenizer, max_length=4096).ids(request))
    assert text.count("<|im_start|>system") == 1 and "persona\n\nmood: happy" in text


def test_a_long_history_never_cuts_the_persona_or_this_messages_hint(
        tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompts = ChatPrompts(tokenizer, max_length=300)
    history = [(m.role, m.content * 3) for m in _chat(30)]
    messages = build_messages("You are Pell, the lighthouse keeper.", "hello", history,
                              state_hint="Mood: happy.")
    ids = prompts.ids(GenerationRequest(messages, SamplingParams(max_new_tokens=8)))
    text = tokenizer.decode(ids)
    assert len(ids) <= 300 - 8
    assert text.startswith("<|im_start|>system\nYou are Pell, the lighthouse keeper.")
    assert "Mood: happy." in text and text.rstrip().endswith("assistant")


# -- the in-process engine keeps a returning viewer's prompt start ------------------------


def _greedy(model: object, ids: list[int], new_tokens: int = 10) -> list[int]:
    import torch

    out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens,  # type: ignore[attr-defined]
                         min_new_tokens=new_tokens, do_sample=False)
    return [int(t) for t in out[0, len(ids):]]


def _run(batch: object, arrivals: dict[int, list[tuple[str, list[int]]]],
         new_tokens: int = 10) -> tuple[dict[str, list[int]], dict[str, int]]:
    """Each request's tokens, and how many of its prompt tokens came from a cache."""
    from engine.serving.continuous import ContinuousBatch, Joining

    assert isinstance(batch, ContinuousBatch)
    tokens: dict[str, list[int]] = {}
    cached: dict[str, int] = {}
    step = 0
    while step <= max(arrivals) or batch.size:
        joining = [Joining(rid, ids, new_tokens, frozenset())
                   for rid, ids in arrivals.get(step, [])]
        if joining:
            batch.join_many(joining)
            cached.update(zip([j.request_id for j in joining], batch.last_cached, strict=True))
        batch.step()
        done = batch.finished()
        tokens.update({row.request_id: list(row.tokens) for row in done})
        batch.leave({row.request_id for row in done})
        step += 1
    return tokens, cached


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_a_returning_viewers_next_prompt_prefills_only_what_is_new(
        tiny_model_dir: Path, static: bool) -> None:
    """The second prompt of each viewer starts with their first (persona, history): that
    part comes from the prefix cache (counted), the reply is still token for token what
    ``generate()`` gives the whole prompt alone, and the viewers' caches do not mix. Static:
    the fixed slots and static prefill a GPU captures, run eagerly (a returning viewer's start
    is copied into the prefill's scratch, the persona's put back for the next new viewer)."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.serving.continuous import ContinuousBatch
    from engine.serving.prefix_cache import BLOCK, PrefixCache

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    persona = list(range(5, 5 + 40))
    ann = persona + list(range(100, 170))  # her history
    bob = persona + list(range(200, 260))
    batch = ContinuousBatch(model, slots=4)
    if static:
        batch.make_static(slots=4, width=256)
    batch.set_prefix(persona)
    batch.prefix_cache = PrefixCache(max_bytes=64 * 2**20)
    past: list[int] = []
    if static:
        assert batch.prefiller.graphs is not None
        run_past = batch.prefiller.graphs.run_past
        batch.prefiller.graphs.run_past = lambda kv, covered, rests: (  # type: ignore[method-assign]
            past.extend(covered) or run_past(kv, covered, rests))
    ann2, bob2 = [*ann, 7, 8, 9, 10], [*bob, 11, 12]
    first, cached_first = _run(batch, {0: [("ann1", [*ann, 1, 2]), ("bob1", [*bob, 3])]})
    second, cached = _run(batch, {0: [("bob2", bob2)],
                                  2: [("ann2", ann2), ("new", [*persona, 4])]})
    assert cached_first == {"ann1": len(persona), "bob1": len(persona)}  # the persona's only
    assert cached["ann2"] >= len(ann) - BLOCK and cached["bob2"] >= len(bob) - BLOCK
    assert cached["new"] == len(persona)  # a new viewer: the persona, as before
    for rid, ids in {"ann1": [*ann, 1, 2], "bob1": [*bob, 3]}.items():
        assert first[rid] == _greedy(model, ids)
    for rid, ids in {"ann2": ann2, "bob2": bob2, "new": [*persona, 4]}.items():
        assert second[rid] == _greedy(model, ids), rid
    assert batch.prefix_cache.hits == 2
    assert len(past) == (2 if static else 0)  # the static prefill took both


def test_the_prefix_cache_keeps_to_its_budget() -> None:
    import torch

    from engine.serving.prefix_cache import PrefixCache

    def kv(tokens: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(torch.zeros(1, 2, tokens, 4), torch.zeros(1, 2, tokens, 4))]

    one = 2 * 2 * 64 * 4 * 4  # bytes of a 64-token entry
    cache = PrefixCache(max_bytes=2 * one)
    for viewer in range(3):
        cache.keep([viewer] * 64, kv(64))
    assert len(cache) == 2 and cache.used_bytes == 2 * one
    assert cache.longest([0] * 64 + [1])[0] is None  # the oldest went first
    entry, tokens = cache.longest([2] * 64 + [1])
    assert entry is not None and tokens == 64
    cache.keep([9] * 1000, kv(1000))  # larger than the whole budget: not kept
    assert len(cache) == 2


def test_the_automatic_prefix_cache_counts_memory_the_allocator_keeps_as_free(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """After graph capture PyTorch's allocator keeps most of what the warm-ups used, which
    the driver reports as taken: ``auto`` hands that back first and takes half of what is
    free then, not half of what the driver saw (which left the cache at 0.0 GiB on an H100)."""
    from types import SimpleNamespace

    import torch

    from engine.backends.transformers_backend import TransformersBackend
    from engine.config import LLMConfig

    gib = 2**30
    backend = TransformersBackend(LLMConfig(prefix_cache_gb="auto"), tmp_path)
    backend.model = SimpleNamespace(device=torch.device("cuda", 0))
    cached = [20 * gib]  # held by the allocator, unused

    def empty_cache() -> None:
        cached[0] = 0

    monkeypatch.setattr(torch.cuda, "empty_cache", empty_cache)
    monkeypatch.setattr(torch.cuda, "mem_get_info",
                        lambda device=None: (21 * gib - cached[0], 80 * gib))
    assert backend.prefix_cache_bytes == (1 + 20) * gib // 2


def test_one_long_paste_does_not_empty_the_history() -> None:
    """A message longer than the whole budget leaves out its own exchange, not the rest."""
    chat = _chat(4)
    pasted = Msg(chat[-2].id, "user", "y" * 500)  # the newest question is a long paste
    read = [*chat[:-2], pasted, chat[-1]]
    kept = HistoryWindows(token_budget=100, count_tokens=_tokens).window(3, read)
    assert kept == chat[2:6]  # the two exchanges before it that fit, in order


@pytest.mark.parametrize("static", [False, True], ids=["dynamic", "static"])
def test_returning_viewers_who_arrive_together_prefill_in_one_forward(
        tiny_model_dir: Path, static: bool) -> None:
    """Five returning viewers and a new one join in one step: the five are prefilled
    together (packed, or a static bucket's rows), each past their own kept start (of
    different lengths) and seeing nothing of the others'; each reply is token for token what
    ``generate()`` gives its prompt alone."""
    import torch
    from transformers import AutoModelForCausalLM

    from engine.serving.continuous import ContinuousBatch
    from engine.serving.prefix_cache import BLOCK, PrefixCache

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    persona = list(range(5, 5 + 40))
    firsts = {name: persona + list(range(start, start + length))
              for name, start, length in (("ann", 100, 70), ("bob", 200, 40), ("cy", 300, 90),
                                          ("dee", 50, 33), ("eve", 250, 45))}
    batch = ContinuousBatch(model, slots=8)
    if static:
        batch.make_static(slots=8, width=320)
    batch.set_prefix(persona)
    batch.prefix_cache = PrefixCache(max_bytes=64 * 2**20)
    _run(batch, {0: [(f"{name}1", ids) for name, ids in firsts.items()]})
    forwards: list[int] = []  # prompts in each forward of returning viewers
    if static:  # through the static buckets, a row each
        assert batch.prefiller.graphs is not None
        run_past = batch.prefiller.graphs.run_past
        batch.prefiller.graphs.run_past = lambda kv, covered, rests: (  # type: ignore[method-assign]
            forwards.append(len(rests)) or run_past(kv, covered, rests))
    else:
        forward = batch.prefiller._forward
        batch.prefiller._forward = lambda packed, cache: (  # type: ignore[method-assign]
            forwards.append(int(packed.ends.numel())) or forward(packed, cache))
    seconds = {f"{name}2": [*ids, 7, 8, 9 + index]
               for index, (name, ids) in enumerate(firsts.items())}
    seconds["new"] = [*persona, 4, 5]
    tokens, cached = _run(batch, {0: list(seconds.items())})
    for name, ids in firsts.items():
        assert cached[f"{name}2"] >= len(ids) - BLOCK
    assert cached["new"] == len(persona)
    # One packed forward for the five (after the new viewer's own); the static buckets take
    # four rows at a time.
    assert forwards == ([4, 1] if static else [1, 5])
    for rid, ids in seconds.items():
        assert tokens[rid] == _greedy(model, ids), rid
    # What the packed forward kept serves their next messages too.
    thirds = {rid.replace("2", "3"): [*ids, 11, 12] for rid, ids in seconds.items()
              if rid != "new"}
    tokens, cached = _run(batch, {0: list(thirds.items())})
    for rid, ids in thirds.items():
        assert cached[rid] >= len(ids) - 2 - BLOCK
        assert tokens[rid] == _greedy(model, ids), rid


def test_a_window_counts_each_message_once() -> None:
    """Tokenizing is a window's cost, on the event loop: a message already counted is not
    tokenized again for the viewer's next message (nor is a text that changed under the
    same id taken for the old one)."""
    counted: list[str] = []

    def count(text: str) -> int:
        counted.append(text)
        return len(text)

    windows = HistoryWindows(token_budget=20 * 17, count_tokens=count)
    chat = _chat(6)
    windows.window(1, chat[:8])
    first = len(counted)
    windows.window(1, chat)
    assert len(counted) - first == 4  # the two new exchanges only
    windows.window(1, [Msg(chat[0].id, "user", "another text"), *chat[1:]])
    assert counted[-1] == "another text"
