"""SillyTavern Character Card V2 ⇄ persona file.

A card is JSON (``{"spec": "chara_card_v2", "data": {...}}``) or a PNG whose ``tEXt``/``iTXt``
chunk with keyword ``chara`` holds that JSON in base64. Imported characters get the bundled
persona's mood and intimacy rules, which the operator can then edit.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
import struct
import zlib
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


def _slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")[:64]
    return slug or "imported"


def card_to_persona(card: dict[str, Any]) -> dict[str, Any]:
    """Persona-file data for a card (validated before it is returned)."""
    template = load_persona()
    name = str(card["name"]).strip()
    data: dict[str, Any] = {
        "id": _slug(name),
        "names": {"zh": name, "en": name, "ja": ""},
        "language": "zh-TW",
        "identity": str(card.get("description", "")).strip() or name,
        "personality": str(card.get("personality", "")).strip(),
        "scenario": str(card.get("scenario", "")).strip(),
        "greeting": str(card.get("first_mes", "")).strip(),
        "example_dialogues": parse_examples(str(card.get("mes_example", ""))),
        "disclosure": f"我是由 AI 驅動的虛擬角色「{name}」，不是真人喔。",
        "moods": template.moods.model_dump(),
        "intimacy": template.intimacy.model_dump(),
        "protected_terms": [name],
    }
    Persona.model_validate(data)
    return data


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
