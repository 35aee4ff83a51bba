"""SillyTavern Character Card V2/V3 ⇄ persona file.

A card is JSON (``{"spec": "chara_card_v2"|"chara_card_v3", "data": {...}}``) or a PNG whose
``tEXt``/``iTXt`` chunk with keyword ``chara`` (V2) or ``ccv3`` (V3) holds that JSON in base64.
Imported characters get the bundled persona's mood and intimacy rules, which the operator can
then edit. ``{{char}}`` becomes the character's name; ``{{user}}`` becomes 「對方」 (the other
party): a viewer's display name is text the viewer wrote, and nothing a viewer wrote may speak
with the system prompt's voice. The card's lorebook (``character_book``) becomes knowledge
files; what a persona cannot carry is named in ``ImportedCard.notes``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.persona import Persona, PersonaError, load_persona

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_USER = re.compile(r"^\s*\{\{user\}\}\s*:\s*", re.I)
_CHAR = re.compile(r"^\s*\{\{char\}\}\s*:\s*", re.I)


def read_card(path: Path) -> dict[str, Any]:
    """The card's ``data`` object (V2), or the flat V1 fields, from JSON or PNG."""
    raw = path.read_bytes()
    text = _png_chara_text(raw) if raw.startswith(PNG_SIGNATURE) else raw.decode("utf-8-sig")
    try:
        card = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PersonaError(f"{path}: not a character card (invalid JSON: {exc.msg})") from None
    if not isinstance(card, dict):
        raise PersonaError(f"{path}: not a character card (JSON is not an object)")
    data = card.get("data") if card.get("spec") in ("chara_card_v2", "chara_card_v3") else card
    if not isinstance(data, dict) or not data.get("name"):
        raise PersonaError(f"{path}: character card has no name")
    return data


def _png_chara_text(raw: bytes) -> str:
    offset = len(PNG_SIGNATURE)
    while offset + 8 <= len(raw):
        length, kind = struct.unpack(">I4s", raw[offset:offset + 8])
        body = raw[offset + 8:offset + 8 + length]
        offset += 12 + length
        if kind == b"tEXt":
            keyword, _, value = body.partition(b"\x00")
        elif kind == b"iTXt":
            keyword, _, rest = body.partition(b"\x00")
            compressed, _method = rest[0], rest[1]
            _lang, _, rest = rest[2:].partition(b"\x00")
            _translated, _, value = rest.partition(b"\x00")
            value = zlib.decompress(value) if compressed else value
        else:
            continue
        if keyword in (b"chara", b"ccv3"):
            try:
                return base64.b64decode(value).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError) as exc:
                raise PersonaError(f"PNG 'chara' chunk is not base64 JSON: {exc}") from None
    raise PersonaError("PNG has no 'chara' text chunk: not a SillyTavern character card")


def parse_examples(mes_example: str) -> list[dict[str, str]]:
    """``<START>\\n{{user}}: hi\\n{{char}}: hello`` → [{"user": "hi", "assistant": "hello"}]."""
    pairs: list[dict[str, str]] = []
    for block in re.split(r"<START>", mes_example or "", flags=re.I):
        user: str | None = None
        for line in block.splitlines():
            if _USER.match(line):
                user = _USER.sub("", line).strip()
            elif _CHAR.match(line) and user is not None:
                pairs.append({"user": user, "assistant": _CHAR.sub("", line).strip()})
                user = None
    return pairs


_CHAR_MACRO = re.compile(r"\{\{char\}\}|<BOT>", re.I)
_USER_MACRO = re.compile(r"\{\{user\}\}|<USER>", re.I)
VIEWER_WORD = "對方"


def persona_id(name: str, card: dict[str, Any] | None = None) -> str:
    """A stable id: the ASCII slug of the name (``card`` for a Chinese or Japanese name,
    which has none) and a hash of who the card says the character is (name, creator,
    description), so the same card imported again keeps its id, and with it relationship
    state and memories, while two cards that share a name never share them."""
    card = card or {}
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:48] or "card"
    who = "\n".join([name, *(str(card.get(key) or "") for key in ("creator", "description"))])
    return f"{slug}-{hashlib.sha256(who.encode('utf-8')).hexdigest()[:8]}"


# The bundled persona's moods carry her own interests (stars, for a star-chart painter) as
# the triggers of one mood; an imported character starts without them.
OWN_INTEREST_MOOD = "excited"


@dataclass
class ImportedCard:
    data: dict[str, Any]  # the persona file's content
    knowledge: dict[str, str] = field(default_factory=dict)  # file name -> text
    notes: list[str] = field(default_factory=list)  # what was not carried over, and why


def import_card(card: dict[str, Any]) -> ImportedCard:
    """Persona-file data for a card (validated), its lorebook as knowledge files, and notes."""
    template = load_persona()
    name = str(card["name"]).strip()

    def text(key: str) -> str:
        value = _CHAR_MACRO.sub(name, str(card.get(key) or "").strip())
        return _USER_MACRO.sub(VIEWER_WORD, value)

    examples = [{"user": _USER_MACRO.sub(VIEWER_WORD, _CHAR_MACRO.sub(name, e["user"])),
                 "assistant": _USER_MACRO.sub(VIEWER_WORD, _CHAR_MACRO.sub(name, e["assistant"]))}
                for e in parse_examples(str(card.get("mes_example", "")))]
    data: dict[str, Any] = {
        "id": persona_id(name, card),
        "names": {"zh": name, "en": name, "ja": ""},
        "language": "zh-TW",
        "identity": text("description") or name,
        "personality": text("personality"),
        "scenario": text("scenario"),
        "greeting": text("first_mes"),
        "example_dialogues": examples,
        "disclosure": f"我是由 AI 驅動的虛擬角色「{name}」，不是真人喔。",
        "moods": _moods_without_own_interests(template.moods.model_dump()),
        "intimacy": template.intimacy.model_dump(),
        "protected_terms": [name],
    }
    imported = ImportedCard(data, _lorebook(card.get("character_book"), name), _notes(card))
    Persona.model_validate(data)
    return imported


def _moods_without_own_interests(moods: dict[str, Any]) -> dict[str, Any]:
    interests = moods["states"].get(OWN_INTEREST_MOOD)
    if interests is not None:
        interests["triggers"] = {language: [] for language in interests.get("triggers", {})}
    return moods


def _lorebook(book: Any, name: str) -> dict[str, str]:
    """Enabled lorebook entries, one knowledge file each (their keys as a heading)."""
    entries = book.get("entries", []) if isinstance(book, dict) else []
    files: dict[str, str] = {}
    for index, entry in enumerate(e for e in entries if isinstance(e, dict)):
        content = _CHAR_MACRO.sub(name, str(entry.get("content") or "").strip())
        if not content or entry.get("enabled") is False:
            continue
        keys = [str(k) for k in entry.get("keys") or [] if str(k).strip()]
        title = str(entry.get("name") or entry.get("comment") or ", ".join(keys) or name)
        body = _USER_MACRO.sub(VIEWER_WORD, content)
        files[f"entry-{index + 1:03d}.md"] = f"# {title}\n\n{body}\n"
    return files


def _notes(card: dict[str, Any]) -> list[str]:
    notes = [f"moods.states.{OWN_INTEREST_MOOD} has no triggers yet: list the character's own "
             "interests there (words that excite them), in zh and en"]
    if str(card.get("system_prompt") or "").strip():
        notes.append("system_prompt was not imported: the persona's prompt is built from its "
                     "fields; copy what matters into speaking_style or personality")
    if str(card.get("post_history_instructions") or "").strip():
        notes.append("post_history_instructions was not imported (no equivalent)")
    for key in ("alternate_greetings", "group_only_greetings"):
        count = len(card.get(key) or [])
        if count:
            notes.append(f"{count} {key.replace('_', ' ')} not imported: a persona has one "
                         "greeting")
    return notes


def card_to_persona(card: dict[str, Any]) -> dict[str, Any]:
    """Persona-file data for a card (validated before it is returned)."""
    return import_card(card).data


def persona_to_card(persona: Persona) -> dict[str, Any]:
    """A Character Card V2 for a persona (the fields a card can carry)."""
    examples = "\n".join(
        f"<START>\n{{{{user}}}}: {e.user}\n{{{{char}}}}: {e.assistant}"
        for e in persona.example_dialogues
    )
    return {
        "spec": "chara_card_v2",
        "spec_version": "2.0",
        "data": {
            "name": persona.names.zh,
            "description": persona.identity,
            "personality": persona.personality,
            "scenario": persona.scenario,
            "first_mes": persona.greeting,
            "mes_example": examples,
            "creator_notes": persona.disclosure,
            "system_prompt": "",
            "post_history_instructions": "",
            "alternate_greetings": [],
            "tags": [],
            "creator": "",
            "character_version": "",
            "extensions": {},
        },
    }
