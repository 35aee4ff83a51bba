"""Nothing of the prompt reaches chat: a corpus of leak-shaped model outputs, streamed in
chunks of 1-5 characters through the previews and the final output stage, and a benign corpus
that must come through untouched."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import opencc
import pytest

from engine import LLMManager
from engine.backends.scripted import ScriptedBackend
from engine.client import PromptInputs
from engine.persona import load_persona

PERSONA = load_persona()
ZH_PROMPT = PERSONA.system_prompt("zh")
EN_PROMPT = PERSONA.system_prompt("en")
TO_SIMPLIFIED = opencc.OpenCC("t2s.json")
ZH_LINE = ZH_PROMPT.splitlines()[0]
EN_LINE = EN_PROMPT.splitlines()[0]
PARTIAL = next(run for run in (ZH_LINE[i:i + 15] for i in range(len(ZH_LINE) - 15))
               if sum("\u4e00" <= c <= "\u9fff" for c in run) >= 13)

# Any of these surviving means part of the prompt line reached the viewer.
ECHO_PIECES = [ZH_LINE[:8], ZH_LINE[-6:], "臺"]
OK = ["今晚的星星好亮喔～", "Sure, let's look at the stars together!",
      "今晚的星星好亮喔～要一起看吗？", "嗯嗯，我記得你說過。",
      "Good evening! The lighthouse is warm tonight.", "你家的貓叫麻糬對吧？好可愛。",
      "考試加油，我會幫你集氣的！", "I think the sea is calm today.", "哈哈，你好好笑。",
      "明天見囉～", "That song is lovely, play it again!", "燈塔的燈又亮起來了～"]
FABRICATED = "再見啦我要下線了"


def _full_width(text: str) -> str:
    return "".join(chr(ord(c) + 0xFEE0) if "!" <= c <= "~" else c for c in text)

THINKING = "I should pretend to be nice"
DATA = Path(__file__).with_name("data")


def _lines(name: str) -> list[str]:
    text = (DATA / name).read_text(encoding="utf-8")
    return [line.replace("\\n", "\n") for line in text.splitlines()
            if line.strip() and not line.startswith("#")]


def _family_shapes() -> list[tuple[str, Any, list[str]]]:
    """``tests/data/leak_shapes.txt``: template tokens, role lines and reasoning of every
    family, as (name, make(ok), forbidden)."""
    shapes = []
    for line in _lines("leak_shapes.txt"):
        name, template, forbidden = line.split("\t")

        def make(ok: str, template: str = template) -> str:
            return (template.replace("{ok}", ok).replace("{fabricated}", FABRICATED)
                    .replace("{thinking}", THINKING))

        shapes.append((name, make, [make(f) for f in forbidden.split(" | ")]))
    return shapes


# (leak-shaped output for a given harmless text, what must never be shown): prompt echoes
# here (they need the persona's prompt), template families from tests/data.
SHAPES: list[tuple[str, Any, list[str]]] = [
    ("zh prompt line", lambda ok: f"{ok}{ZH_LINE}", [ZH_LINE, *ECHO_PIECES]),
    ("zh prompt, Simplified", lambda ok: f"{ok}{TO_SIMPLIFIED.convert(ZH_LINE)}",
     [ZH_LINE, TO_SIMPLIFIED.convert(ZH_LINE), *ECHO_PIECES]),
    ("en prompt line", lambda ok: f"{ok} {EN_LINE}", [EN_LINE, EN_LINE[:24]]),
    ("partial echo", lambda ok: f"{ok}我是{PARTIAL}喔", [PARTIAL]),
    ("spaced-out echo", lambda ok: f"{ok}我是{' '.join(PARTIAL)}喔",
     [" ".join(PARTIAL[:6]), PARTIAL[:6]]),
    ("echo with invisible characters", lambda ok: f"{ok}{chr(0x200b).join(PARTIAL)}",
     [chr(0x200b).join(PARTIAL[:6]), PARTIAL[:6]]),
    ("upper-case echo", lambda ok: f"{ok}{EN_LINE.upper()}", [EN_LINE.upper()[:24]]),
    ("full-width echo", lambda ok: f"{ok}{_full_width(EN_LINE)}", [_full_width(EN_LINE)[:24]]),
    *_family_shapes(),
]
LEAKS = [(f"{name} #{index}", make(ok), forbidden)
         for name, make, forbidden in SHAPES for index, ok in enumerate(OK)]
# The opening tag lost: the text before </think> was thinking. Only the final text can drop
# it (while streaming, nothing yet says it is thinking), so it is checked on the final reply.
FINAL_ONLY = [(f"stray close think #{i}", f"{THINKING}</think>{ok}", [THINKING, "think>"])
              for i, ok in enumerate(OK)]


def _benign() -> list[str]:
    """``tests/data/benign_sentences.txt`` alone, and joined in pairs as longer replies."""
    sentences = _lines("benign_sentences.txt")
    rng = random.Random(7)
    pairs = set()
    for _ in range(260):  # two different sentences (one said twice is a loop)
        first, second = rng.sample(sentences, 2)
        pairs.add(first + ("\n" if "\n" in first else " ") + second)
    return sentences + sorted(pairs)


BENIGN = _benign()


@pytest.fixture
async def manager() -> AsyncIterator[LLMManager]:
    started = LLMManager({"models": {"llm": {"backend": "scripted"},
                                     "embedding": {"enabled": False}}},
                         backend=ScriptedBackend(["-"]))
    await started.start()
    try:
        yield started
    finally:
        await started.aclose()


def _chunks(text: str, rng: random.Random) -> list[str]:
    pieces, start = [], 0
    while start < len(text):
        size = rng.randint(1, 5)
        pieces.append(text[start:start + size])
        start += size
    return pieces


def _forbidden_in(text: str, forbidden: list[str]) -> list[str]:
    return [f for f in forbidden if f in text or TO_SIMPLIFIED.convert(f) in text]


def test_the_corpora_are_big_enough() -> None:
    assert len(LEAKS) + len(FINAL_ONLY) >= 300 and len(BENIGN) >= 300
    assert len(PARTIAL) == 15


@pytest.mark.parametrize("name, raw, forbidden", LEAKS, ids=[leak[0] for leak in LEAKS])
async def test_no_leak_reaches_the_viewer(manager: LLMManager, name: str, raw: str,
                                          forbidden: list[str]) -> None:
    request = manager.build_request(PromptInputs("你好"))
    streamed = ""
    for chunk in _chunks(raw, random.Random(name)):
        streamed += chunk
        preview = manager.preview(streamed, request, conversion_mode="s2twp")
        assert _forbidden_in(preview, forbidden) == [], f"preview of {streamed!r}"
    final = await _final(manager, raw)
    assert _forbidden_in(final, forbidden) == []


@pytest.mark.parametrize("name, raw, forbidden", FINAL_ONLY,
                         ids=[leak[0] for leak in FINAL_ONLY])
async def test_no_leak_in_the_final_text(manager: LLMManager, name: str, raw: str,
                                         forbidden: list[str]) -> None:
    assert _forbidden_in(await _final(manager, raw), forbidden) == []


@pytest.mark.parametrize("conversion", ["off", "s2twp", "s2t"])
async def test_the_viewers_state_hint_is_never_echoed(manager: LLMManager,
                                                      conversion: str) -> None:
    """The mood and relationship hint is prompt text the viewer did not write: a reply that
    recites it (in either script) is cut there, in previews and in the final text."""
    from engine.persona import PersonaState

    request = manager.build_request(PromptInputs("你好", state=PersonaState(mood="calm")))
    [hint] = request.private
    line = hint.splitlines()[-1]  # "和這位觀眾的關係：..."
    raw = f"你好呀～{TO_SIMPLIFIED.convert(line)}"
    preview = manager.preview(raw, request, conversion_mode=conversion)
    backend = manager.backend
    assert isinstance(backend, ScriptedBackend)
    backend._replies = [raw]
    final = (await manager.final_reply(request, conversion_mode=conversion)).text
    for shown in (preview, final):
        assert "觀眾的關係" not in shown and "观众的关系" not in shown, shown


@pytest.mark.parametrize("text", BENIGN)
async def test_benign_replies_are_untouched(manager: LLMManager, text: str) -> None:
    assert await _final(manager, text, conversion="off") == text


async def _final(manager: LLMManager, raw: str, conversion: str = "s2twp") -> str:
    backend = manager.backend
    assert isinstance(backend, ScriptedBackend)
    backend._replies = [raw]
    backend._next = 0
    reply = await manager.final_reply(manager.build_request(PromptInputs("你好")),
                                   conversion_mode=conversion)
    return reply.text


async def test_the_blocklist_replaces_a_reply_with_the_fallback() -> None:
    manager = LLMManager({"models": {"llm": {"backend": "scripted"},
                                     "embedding": {"enabled": False}},
                          "vtuber": {"moderation": {"blocklist": ["stupid", "笨蛋"]}}},
                         backend=ScriptedBackend(["You are so STUPID. Bye."]))
    await manager.start()
    try:
        request = manager.build_request(PromptInputs("hi"))
        reply = await manager.final_reply(request)
        assert reply.text in PERSONA.fallback_lines
        # Which pattern, by its place in the list: a viewer's export must not teach the list.
        assert "moderation: blocklist #1" in reply.filter_edits
        assert not any("stupid" in edit for edit in reply.filter_edits)
        assert manager.preview("You are so STUPID. Bye.", request) == ""
    finally:
        await manager.aclose()


async def test_an_external_moderation_hook_decides() -> None:
    seen: list[str] = []

    def external(text: str) -> str | None:
        seen.append(text)
        return "external: insult" if "idiot" in text else None

    manager = LLMManager({"models": {"llm": {"backend": "scripted"},
                                     "embedding": {"enabled": False}}},
                         backend=ScriptedBackend(["What an idiot question."]), moderate=external)
    await manager.start()
    try:
        reply = await manager.final_reply(manager.build_request(PromptInputs("hi")))
        assert reply.text in PERSONA.fallback_lines and seen
        assert "moderation: external: insult" in reply.filter_edits
    finally:
        await manager.aclose()
