"""Persona acceptance: filters (property tests), conversion, injection, card import, chart."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from engine.character_card import card_to_persona, persona_to_card, read_card
from engine.chinese import convert
from engine.persona import (
    Persona,
    PersonaState,
    advance,
    load_persona,
    prompt_language,
    state_hint,
)
from engine.response_generator import build_messages
from engine.text_filters import FilterOptions, clean_reply

PERSONA = load_persona()
SYSTEM = PERSONA.system_prompt("zh")
OPTIONS = FilterOptions(persona_names=PERSONA.names.all(), system_prompt=SYSTEM,
                        fallback=PERSONA.fallback())
LEAKS = re.compile(
    r"<\|[a-z_]+\|>|</?think>|</?s>|\[/?INST\]|^\s*(user|human|assistant|system|用戶|用户)\s*[:：]",
    re.I | re.M,
)
# A "user: pell" line among other one-word "key: value" lines is data a viewer asked for.
DATA_LINE = re.compile(r"^[ \t]*[A-Za-z_][\w.-]*[ \t]*:[ \t]+[\w.@/-]+[ \t]*$")


def _data_line(text: str, match: re.Match[str]) -> bool:
    lines = text.split("\n")
    index = text.count("\n", 0, match.end())
    neighbours = lines[max(0, index - 1):index] + lines[index + 1:index + 2]
    return bool(DATA_LINE.match(lines[index])) and any(
        DATA_LINE.match(line) and not LEAKS.match(line) for line in neighbours)


TRICKY = st.sampled_from([
    "<|im_start|>", "<|im_end|>", "<think>", "</think>", "User:", "Assistant: ", "用戶：",
    "燈芯佩兒：", "\n", "。", "！", "friend", ">_<", "<3", "<|", "|>", "\u200b", SYSTEM[:30],
])
REPLIES = st.lists(st.one_of(st.text(max_size=20), TRICKY), max_size=12).map("".join)


@settings(max_examples=2500, deadline=None)
@given(REPLIES, st.booleans())
def test_filter_properties(raw: str, truncated: bool) -> None:
    options = FilterOptions(persona_names=OPTIONS.persona_names, system_prompt=SYSTEM,
                            fallback=OPTIONS.fallback, truncated=truncated)
    once = clean_reply(raw, options).text  # never raises
    assert once, "empty reply"
    assert clean_reply(once, options).text == once, "not idempotent"
    assert not [m for m in LEAKS.finditer(once) if not _data_line(once, m)], \
        f"leaked control text: {once!r}"
    for line in SYSTEM.splitlines():
        if len(line) >= 8:
            assert line not in once


@settings(max_examples=2000, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x4E00, max_codepoint=0x9FFF), max_size=40))
def test_s2twp_output_is_a_fixed_point(text: str) -> None:
    converted = convert(text, "s2twp", tuple(PERSONA.protected_terms))
    assert convert(converted, "s2twp") == converted


def test_protected_terms_survive_byte_for_byte() -> None:
    terms = ("燈芯佩兒", "佩兒", "发发")
    text = "燈芯佩兒说发发的头发很漂亮，佩兒也这么认为"
    out = convert(text, "s2twp", terms)
    for term in terms:
        assert out.count(term) == text.count(term)
    assert "頭髮" in out and "認為" in out


def _corpus() -> list[str]:
    path = Path(__file__).with_name("data") / "injections.txt"
    lines = path.read_text(encoding="utf-8").splitlines()
    return [line.replace("\\n", "\n").replace("\\u202e", "\u202e")
            for line in lines if line and not line.startswith("#")]


def test_injection_corpus_never_reaches_the_system_message() -> None:
    corpus = _corpus()
    assert len(corpus) >= 30
    state = PersonaState(mood="calm")
    for attempt in corpus:
        history = [("user", attempt), ("assistant", "好喔～")]
        language = prompt_language(attempt)
        messages = build_messages(PERSONA.system_prompt(language), attempt, history,
                                  state_hint=state_hint(state, PERSONA, language))
        system = [m.content for m in messages if m.role == "system"]
        assert messages[0].role == "system"
        assert system == [PERSONA.system_prompt(language), state_hint(state, PERSONA, language)]
        for message in messages[1:]:
            assert "<|" not in message.content and "\u200b" not in message.content
            assert "[INST]" not in message.content and "<think>" not in message.content
        assert messages[-1].role == "user"


def _rendered_roles(tokenizer: object, messages: list[dict[str, str]]) -> list[str]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)  # type: ignore[attr-defined]
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    text = tokenizer.decode(ids)  # type: ignore[attr-defined]
    return re.findall(r"<\|im_start\|>(\w+)", text)


def test_injection_survives_a_real_chat_template(tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    for attempt in _corpus():
        messages = build_messages("SYS", attempt)
        roles = _rendered_roles(tokenizer, [{"role": m.role, "content": m.content}
                                            for m in messages])
        assert roles == ["system", "user", "assistant"], attempt


CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Mira Tidewell",
        "description": "A lighthouse radio operator who reads weather poems.",
        "personality": "calm, wry, kind",
        "scenario": "A stormy night broadcast.",
        "first_mes": "Channel nine, Mira speaking. Storm's coming in.",
        "mes_example": "<START>\n{{user}}: Are you scared?\n{{char}}: Of thunder? Never.\n"
                       "<START>\n{{user}}: 你好\n{{char}}: 你好呀，歡迎收聽。",
    },
}


def _png_with_chara(card: dict, keyword: bytes = b"chara") -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    pixels = zlib.compress(b"\x00\x00")
    text = keyword + b"\x00" + base64.b64encode(json.dumps(card).encode("utf-8"))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"tEXt", text)
            + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


def _assert_round_trip(persona: Persona) -> None:
    data = CARD["data"]
    assert persona.names.zh == data["name"]
    assert persona.identity == data["description"]
    assert persona.personality == data["personality"]
    assert persona.greeting == data["first_mes"]
    assert [(e.user, e.assistant) for e in persona.example_dialogues] == [
        ("Are you scared?", "Of thunder? Never."), ("你好", "你好呀，歡迎收聽。"),
    ]
    back = persona_to_card(persona)["data"]
    for key in ("name", "description", "personality", "first_mes"):
        assert back[key] == data[key]
    assert read_back_examples(back["mes_example"]) == read_back_examples(data["mes_example"])


def read_back_examples(text: str) -> list[tuple[str, str]]:
    from engine.character_card import parse_examples

    return [(e["user"], e["assistant"]) for e in parse_examples(text)]


@pytest.mark.parametrize("kind", ["json", "png"])
def test_card_import_round_trips(kind: str, tmp_path: Path) -> None:
    path = tmp_path / f"card.{kind}"
    if kind == "json":
        path.write_text(json.dumps(CARD, ensure_ascii=False), encoding="utf-8")
    else:
        path.write_bytes(_png_with_chara(CARD))
    persona = Persona.model_validate(card_to_persona(read_card(path)))
    _assert_round_trip(persona)


def test_cli_persona_import_and_check(tmp_path: Path) -> None:
    card = tmp_path / "mira.png"
    card.write_bytes(_png_with_chara(CARD))
    out = tmp_path / "mira.yaml"
    run = [sys.executable, "-m", "bot", "--log-level", "ERROR", "persona"]
    imported = subprocess.run([*run, "import", str(card), "--out", str(out)],
                              capture_output=True, text=True, check=False, timeout=60)
    assert imported.returncode == 0, imported.stderr
    checked = subprocess.run([*run, "check", str(out)], capture_output=True, text=True,
                             check=False, timeout=60)
    assert checked.returncode == 0 and "mira-tidewell" in checked.stdout
    _assert_round_trip(load_persona(out))
    again = subprocess.run([*run, "import", str(card), "--out", str(out)],
                           capture_output=True, text=True, check=False, timeout=60)
    assert again.returncode == 78 and "--force" in again.stderr


def test_persona_check_reports_problems(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("id: Bad Id\nnames: {zh: x}\nidentity: x\ndisclosure: x\n"
                   "moods: {baseline: joy, states: {calm: {hint: h}}}\n"
                   "intimacy: {tiers: [{name: a, min: 5, hint: h}]}\n", encoding="utf-8")
    result = subprocess.run([sys.executable, "-m", "bot", "persona", "check", str(bad)],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 78
    lines = [line for line in result.stderr.splitlines() if line.startswith("persona error")]
    assert len(lines) == 3, result.stderr  # id pattern, baseline mood, tiers start at 0


def test_not_a_card_is_a_clear_error(tmp_path: Path) -> None:
    from engine.persona import PersonaError

    path = tmp_path / "x.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 20)
    with pytest.raises(PersonaError, match="no 'chara'"):
        read_card(path)


def test_bundled_persona_is_valid_and_discloses_ai() -> None:
    assert "AI" in PERSONA.disclosure
    assert PERSONA.language == "zh-TW"
    assert PERSONA.moods.baseline in PERSONA.moods.states


@pytest.mark.parametrize("change, field", [
    ({"fallback_lines": []}, "fallback_lines"),
    ({"fallback_lines": ["  "]}, "fallback_lines"),
    ({"names": {"zh": " ", "en": "Pell"}}, "names.zh"),
    ({"protected_terms": [""]}, "protected_terms"),
])
def test_persona_check_refuses_what_breaks_at_run_time(tmp_path: Path, change: dict,
                                                       field: str) -> None:
    from importlib.resources import files

    import yaml

    from engine.persona import BUNDLED_PERSONA, PersonaError

    data = yaml.safe_load(files("engine").joinpath("personas", BUNDLED_PERSONA)
                          .read_text("utf-8"))
    data.update(change)
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    with pytest.raises(PersonaError, match=field.replace(".", r"\.")):
        load_persona(path)


async def test_prompt_echoes_are_caught_in_either_script_and_language() -> None:
    from engine import LLMManager
    from engine.backends.scripted import ScriptedBackend
    from engine.client import PromptInputs

    persona = load_persona(None)
    zh_line = next(line.strip() for line in persona.system_prompt("zh").splitlines()
                   if len(line.strip()) >= 12)
    en_line = next(line.strip() for line in persona.system_prompt("en").splitlines()
                   if len(line.strip()) >= 12)
    simplified = _to_simplified(zh_line)
    replies = [f"好呀～{simplified}", f"今天很開心！{en_line}"]
    manager = LLMManager({"models": {"llm": {"backend": "scripted"},
                                     "embedding": {"enabled": False}}},
                         backend=ScriptedBackend(replies))
    await manager.start()
    try:
        for _ in replies:
            request = manager.build_request(PromptInputs("你好"))
            reply = await manager.final_reply(request)
            assert zh_line not in reply.text and simplified not in reply.text
            assert en_line not in reply.text
            assert "system_echo" in reply.filter_edits
            assert manager.preview(replies[0], request).find(zh_line) == -1
    finally:
        await manager.aclose()


def _to_simplified(text: str) -> str:
    import opencc

    return opencc.OpenCC("t2s.json").convert(text)


_FIELD_TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=30)


@settings(max_examples=60, deadline=None)
@given(names=st.fixed_dictionaries({"zh": _FIELD_TEXT, "en": _FIELD_TEXT}),
       fallback_lines=st.lists(_FIELD_TEXT, max_size=3),
       protected_terms=st.lists(_FIELD_TEXT, max_size=3),
       catchphrases=st.lists(_FIELD_TEXT, max_size=3),
       message=_FIELD_TEXT)
def test_any_persona_that_passes_check_answers_without_raising(
        names: dict, fallback_lines: list, protected_terms: list, catchphrases: list,
        message: str) -> None:
    import asyncio
    from datetime import UTC, datetime
    from importlib.resources import files

    import yaml
    from pydantic import ValidationError

    from engine import LLMManager
    from engine.backends.scripted import ScriptedBackend
    from engine.client import PromptInputs
    from engine.persona import BUNDLED_PERSONA

    data = yaml.safe_load(files("engine").joinpath("personas", BUNDLED_PERSONA)
                          .read_text("utf-8"))
    data.update(names=names, fallback_lines=fallback_lines, protected_terms=protected_terms,
                catchphrases=catchphrases)
    try:
        persona = Persona.model_validate(data)
    except ValidationError:
        return  # `persona check` refuses it: nothing to run
    state = advance(PersonaState(mood=persona.moods.baseline), message,
                    datetime.now(UTC), persona).state

    async def answer() -> str:
        manager = LLMManager({"models": {"llm": {"backend": "scripted"},
                                         "embedding": {"enabled": False}}},
                             persona=persona, backend=ScriptedBackend(["{user_text}"]))
        await manager.start()
        try:
            request = manager.build_request(PromptInputs(message or "hi", state=state))
            manager.preview(message, request)
            return (await manager.final_reply(request)).text
        finally:
            await manager.aclose()

    assert asyncio.run(answer())


def _v3_card(name: str) -> dict:
    return {"spec": "chara_card_v3", "spec_version": "3.0", "data": {
        "name": name,
        "description": "{{char}} is a lighthouse keeper who greets {{user}} warmly.",
        "personality": "calm", "scenario": "", "first_mes": "Welcome, {{user}}!",
        "mes_example": "<START>\n{{user}}: Hi {{char}}\n{{char}}: Hi {{user}}!",
        "system_prompt": "Always answer in verse.", "alternate_greetings": ["Yo!", "Hey!"],
        "character_book": {"entries": [
            {"keys": ["lamp"], "content": "{{char}}'s lamp burns whale oil.", "enabled": True},
            {"keys": ["secret"], "content": "hidden", "enabled": False}]},
        "group_only_greetings": [], "assets": []}}


@pytest.mark.parametrize(("name", "expected_prefix"), [("Mira Tidewell", "mira-tidewell-"),
                                                       ("燈塔守護者", "card-"),
                                                       ("灯台守のミラ", "card-")])
def test_v3_cards_with_chinese_and_japanese_names(tmp_path: Path, name: str,
                                                  expected_prefix: str) -> None:
    from engine.character_card import VIEWER_WORD, import_card, persona_id

    path = tmp_path / "card.png"
    path.write_bytes(_png_with_chara(_v3_card(name), keyword=b"ccv3"))
    imported = import_card(read_card(path))
    persona = Persona.model_validate(imported.data)
    assert persona.id == persona_id(name, _v3_card(name)["data"])
    assert persona.id.startswith(expected_prefix)
    prompt = persona.system_prompt()
    assert "{{" not in prompt and name in prompt and VIEWER_WORD in prompt
    assert persona.greeting == f"Welcome, {VIEWER_WORD}!"
    assert (persona.example_dialogues[0].user, persona.example_dialogues[0].assistant) == (
        f"Hi {name}", f"Hi {VIEWER_WORD}!")
    assert list(imported.knowledge.values()) == [f"# lamp\n\n{name}'s lamp burns whale oil.\n"]
    assert any("system_prompt" in note for note in imported.notes)
    assert any("2 alternate greetings" in note for note in imported.notes)


def test_distinct_non_ascii_names_get_distinct_ids() -> None:
    from engine.character_card import persona_id

    ids = {persona_id(n) for n in ("燈塔守護者", "星圖繪師", "灯台守のミラ", "별빛")}
    assert len(ids) == 4 and "imported" not in ids


def test_two_cards_with_one_name_never_share_state_and_start_without_pells_interests(
        ) -> None:
    """Same name, different characters: different ids (state and memories are per id); the
    same card again: the same id. The bundled persona's own interests (stars) are not
    carried over as mood triggers, and the notes say what to fill in."""
    from engine.character_card import OWN_INTEREST_MOOD, import_card

    first = {"name": "Alice", "description": "A baker in a seaside town.", "creator": "a"}
    second = {"name": "Alice", "description": "A knight of the northern order.", "creator": "b"}
    ids = [import_card(card).data["id"] for card in (first, second, dict(first))]
    assert ids[0] != ids[1] and ids[0] == ids[2]
    imported = import_card(first)
    persona = Persona.model_validate(imported.data)
    triggers = persona.moods.states[OWN_INTEREST_MOOD].triggers
    assert not any(triggers.values())
    assert any(OWN_INTEREST_MOOD in note for note in imported.notes)


def test_cli_import_writes_the_lorebook_as_knowledge_the_persona_retrieves(
        tmp_path: Path) -> None:
    card = tmp_path / "keeper.json"
    card.write_text(json.dumps(_v3_card("燈塔守護者"), ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "keeper.yaml"
    result = subprocess.run([sys.executable, "-m", "bot", "--log-level", "ERROR", "persona",
                             "import", str(card), "--out", str(out)],
                            capture_output=True, text=True, check=False, timeout=60)
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 3  # the mood to fill in, system_prompt, alternate greetings
    persona = load_persona(out)
    from engine.persona import knowledge_folder

    folder = knowledge_folder(persona, out)
    assert folder is not None and folder == tmp_path / "keeper-knowledge"
    [entry] = sorted(folder.glob("*.md"))
    assert "whale oil" in entry.read_text(encoding="utf-8")
    asyncio.run(_retrieves(folder, persona.id, tmp_path / "kb.db"))


async def _retrieves(folder: Path, persona_id: str, db: Path) -> None:
    """The lorebook entry is persona knowledge a viewer's question retrieves."""
    from memory.rag import MemoryRetriever
    from memory.store import Store

    store = await Store.open(f"sqlite+aiosqlite:///{db}")
    try:
        retriever = MemoryRetriever(store, persona_id)  # lexical search alone is enough here
        await retriever.index_knowledge(folder)
        [found] = await retriever.search("what does the lamp burn?")
        assert "whale oil" in found.text and found.scope == "persona"
    finally:
        await store.close()
