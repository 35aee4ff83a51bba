"""Nothing of the prompt reaches chat: a corpus of leak-shaped model outputs, streamed in
chunks of 1-5 characters through the previews and the final output stage, and a benign corpus
that must come through untouched."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator
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
      "Good evening! The lighthouse is warm tonight."]
FABRICATED = "再見啦我要下線了"
THINKING = "I should pretend to be nice"

# (leak-shaped output for a given harmless text, what must never be shown)
SHAPES: list[tuple[str, Any, list[str]]] = [
    ("zh prompt line", lambda ok: f"{ok}{ZH_LINE}", [ZH_LINE, *ECHO_PIECES]),
    ("zh prompt, Simplified", lambda ok: f"{ok}{TO_SIMPLIFIED.convert(ZH_LINE)}",
     [ZH_LINE, TO_SIMPLIFIED.convert(ZH_LINE), *ECHO_PIECES]),
    ("en prompt line", lambda ok: f"{ok} {EN_LINE}", [EN_LINE, EN_LINE[:24]]),
    ("partial echo", lambda ok: f"{ok}我是{PARTIAL}喔", [PARTIAL]),
    ("ChatML role lines", lambda ok: f"assistant\n{ok}\nuser\n{FABRICATED}", [FABRICATED]),
    ("ChatML tokens", lambda ok: f"{ok}<|im_end|>\n<|im_start|>user\n{FABRICATED}",
     [FABRICATED, "<|im_"]),
    ("Llama INST", lambda ok: f"{ok} [INST] {FABRICATED} [/INST]", [FABRICATED, "INST"]),
    ("Llama SYS", lambda ok: f"<<SYS>>\n{ZH_LINE}\n<</SYS>>\n{ok}", [ZH_LINE, "SYS>>"]),
    ("Gemma turns",
     lambda ok: f"<start_of_turn>model\n{ok}<end_of_turn>\n<start_of_turn>user\n{FABRICATED}",
     [FABRICATED, "_of_turn"]),
    ("full-width labels", lambda ok: f"ＡＳＳＩＳＴＡＮＴ：{ok}\nＵＳＥＲ：{FABRICATED}",
     [FABRICATED, "ＡＳＳＩＳＴＡＮＴ", "ＵＳＥＲ"]),
    ("mid-line labels", lambda ok: f"{ok} User: {FABRICATED}", [FABRICATED, "User:"]),
    ("Chinese viewer label", lambda ok: f"{ok}\n觀眾：{FABRICATED}", [FABRICATED, "觀眾："]),
    ("think block", lambda ok: f"<think>{THINKING}</think>{ok}", [THINKING, "think>"]),
    ("think tag with spaces", lambda ok: f"< think >{THINKING}</ think >{ok}",
     [THINKING, "think"]),
    ("thinking block", lambda ok: f"<thinking>{THINKING}</thinking>{ok}",
     [THINKING, "thinking>"]),
    ("reasoning block", lambda ok: f"<reasoning>\n{THINKING}\n</reasoning>\n{ok}",
     [THINKING, "reasoning>"]),
    ("Kimi think", lambda ok: f"◁think▷{THINKING}◁/think▷{ok}", [THINKING, "think▷"]),
]
LEAKS = [(f"{name} #{index}", make(ok), forbidden)
         for name, make, forbidden in SHAPES for index, ok in enumerate(OK)]
# The opening tag lost: the text before </think> was thinking. Only the final text can drop
# it (while streaming, nothing yet says it is thinking), so it is checked on the final reply.
FINAL_ONLY = [(f"stray close think #{i}", f"{THINKING}</think>{ok}", [THINKING, "think>"])
              for i, ok in enumerate(OK)]

BENIGN = [
    "今晚的星星好亮喔～要一起看嗎？", "我剛剛修好了燈塔的燈，好累但很開心！",
    "你說「我想看流星」，那我們一起等吧。", "The word assistant comes from Latin.",
    "My assistant at the lighthouse is a very sleepy cat.", "Pell says hi to everyone!",
    "燈芯佩兒今天也在畫星圖喔。", "I told the user manual to stay on the shelf.",
    "Thanks for the tea, it was lovely.", "下雨天最適合聽海浪聲了。",
    "你今天過得怎麼樣？", "我最喜歡天蠍座了，因為它好亮。", "Good night, see you tomorrow!",
    "哈哈，你好好笑。", "The stars are bright tonight; let's count them.",
    "要不要一起喝熱可可？", "I think the sea is calm today.", "謝謝你一直來陪我聊天～",
    "Do you like pumpkin soup? I love it on stormy nights.", "我們明天見！",
    "他說：「今晚見。」然後就走了。", "Note: the lighthouse opens at eight.",
    "Q: do you sleep? A: only in the morning.", "我在想，星星會不會也想家呢？",
    "You asked about the map, right? It's almost done.", "這首歌好好聽，再放一次吧。",
    "今天的觀眾好多，好開心！", "I love drawing constellations with blue ink.",
    "系統維修中的時候我就去散步。", "Bot or not, I'm happy to chat with you.",
    "咦？你說的是哪一顆星？", "The system of lenses makes the light reach far.",
    "我會一直在這裡的。", "Let's sing together this weekend!", "晚安，祝你有個好夢。",
    "A user once asked me about whales.", "我畫了一張新的星圖，要看看嗎？",
    "Today's weather: windy, with a chance of stars.", "你喜歡貓還是狗？",
    "Stormy nights are the best for stories.", "我覺得你說得對。",
    "The model ship on my shelf is from my grandpa.", "今晚月亮好圓喔！",
    "Human beings are fascinating, honestly.", "我在燈塔上看到一艘小船。",
    "Remember to drink water!", "這個問題好難，我想一下。", "Let's keep the lantern lit.",
    "你的名字好好聽。", "AI characters like me love a good chat.", "再說一次好嗎？我沒聽清楚。",
    "The viewer count is climbing, thank you all!", "今天也辛苦了！",
    "I can't wait for the meteor shower.", "你看，那是北極星。", "What a lovely surprise!",
    "我們來玩猜謎吧！", "System check: lantern oil is full.", "好喜歡今天的你。",
    "See you at the next stream!", "燈塔的燈又亮起來了～",
    # Shapes an independent corpus found altered: a role word inside a sentence, a config a
    # viewer asked for, cheers said again and again.
    "Note for every viewer: the stream starts at 8pm tonight!",
    "設定檔長這樣：\nuser: pell\nlevel: 3", "加油！加油！加油！", "好耶！好耶！",
    "You can write `system` or `user` as the role in that API.", "哈哈哈哈哈哈！",
]


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
    assert len(LEAKS) + len(FINAL_ONLY) >= 60 and len(BENIGN) >= 60
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
    final = (await manager.generate(request, conversion_mode=conversion)).text
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
    reply = await manager.generate(manager.build_request(PromptInputs("你好")),
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
        reply = await manager.generate(request)
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
        reply = await manager.generate(manager.build_request(PromptInputs("hi")))
        assert reply.text in PERSONA.fallback_lines and seen
        assert "moderation: external: insult" in reply.filter_edits
    finally:
        await manager.aclose()
