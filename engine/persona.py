"""The persona: a validated YAML definition plus pure state rules (mood and intimacy).

Rules are pure functions of (state, message, time, persona), so they are tested with a fake
clock, and every change carries its cause for the audit trail. State is per user; nothing
here is global.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from datetime import datetime
from importlib.resources import files
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)

from engine.errors import EngineError

BUNDLED_PERSONA = "pell.yaml"


class PersonaError(EngineError):
    """A persona file is missing or invalid (one line per problem)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


NonBlank = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]


class Names(_Strict):
    zh: NonBlank  # viewers call the persona by its names: a blank one would match everything
    en: str = ""
    ja: str = ""

    @field_validator("en", "ja")
    @classmethod
    def _stripped(cls, value: str) -> str:
        return value.strip()

    def all(self) -> tuple[str, ...]:
        return tuple(n for n in (self.zh, self.en, self.ja) if n)


class ExampleDialogue(_Strict):
    user: str
    assistant: str


class MoodDefinition(_Strict):
    hint: str
    # How the mood is named where viewers see it (the stream overlay); the key otherwise.
    name: str | None = None
    # Trigger words per language code; any language may be listed.
    triggers: dict[str, list[str]] = Field(default_factory=dict)


class MoodRules(_Strict):
    baseline: str
    decay_half_life_minutes: float = Field(60.0, gt=0)
    states: dict[str, MoodDefinition]

    @model_validator(mode="after")
    def _baseline_exists(self) -> MoodRules:
        if self.baseline not in self.states:
            raise ValueError(f"baseline mood {self.baseline!r} is not one of the states "
                             f"{sorted(self.states)}")
        return self


class IntimacyTier(_Strict):
    name: str
    min: float = Field(ge=0, le=100)
    hint: str


class IntimacyRules(_Strict):
    base_gain: float = Field(0.5, ge=0)
    max_change_per_message: float = Field(2.0, gt=0, le=100)
    daily_cap: float = Field(10.0, gt=0, le=100)
    grace_days: float = Field(3.0, ge=0)
    decay_per_day: float = Field(0.5, ge=0)
    positive_triggers: list[str] = Field(default_factory=list)
    negative_triggers: list[str] = Field(default_factory=list)
    tiers: list[IntimacyTier]

    @model_validator(mode="after")
    def _tiers_sorted(self) -> IntimacyRules:
        mins = [t.min for t in self.tiers]
        if not mins or mins[0] != 0 or mins != sorted(mins):
            raise ValueError("tiers must start at min 0 and be in ascending order")
        return self


class EnglishText(_Strict):
    """English wording of the persona, used when a viewer writes without any CJK text
    (small English-only models answer far better to an English system prompt)."""

    identity: str
    traits: list[str] = Field(default_factory=list)
    speaking_style: str = ""


class Persona(_Strict):
    id: str = Field(pattern=r"^[a-z0-9_-]{1,64}$")
    names: Names
    language: str = "zh-TW"
    identity: str
    personality: str = ""
    scenario: str = ""
    greeting: str = ""
    traits: list[str] = Field(default_factory=list)
    speaking_style: str = ""
    catchphrases: list[str] = Field(default_factory=list)
    example_dialogues: list[ExampleDialogue] = Field(default_factory=list)
    disclosure: str
    english: EnglishText | None = None
    moods: MoodRules
    intimacy: IntimacyRules
    knowledge_dir: str | None = None
    # Never converted between scripts; an empty term would match every message.
    protected_terms: list[NonBlank] = Field(default_factory=list)
    # The in-character lines sent when a reply fails: at least one, none blank.
    fallback_lines: list[NonBlank] = Field(
        default_factory=lambda: ["……欸？剛剛恍神了，再說一次好嗎？"], min_length=1)

    def system_prompt(self, language: str = "zh") -> str:
        """The fixed part of the system prompt (state hints are appended per user)."""
        if language == "en" and self.english is not None:
            return self._english_prompt(self.english)
        lines = [
            f"你是「{self.names.zh}」（{self.names.en}），{self.identity}",
            f"個性：{'、'.join(self.traits)}。" if self.traits else "",
            self.personality,
            self.scenario,
            f"說話風格：{self.speaking_style}" if self.speaking_style else "",
            f"口頭禪：{'、'.join(self.catchphrases)}" if self.catchphrases else "",
            "回覆簡短自然（一到三句），用對方的語言回答；不要替對方說話。",
        ]
        for example in self.example_dialogues[:2]:
            lines.append(f"範例——觀眾：{example.user} ／ 你：{example.assistant}")
        return "\n".join(line for line in lines if line)

    def own_phrases(self) -> tuple[str, ...]:
        """Parts of the prompt the persona may say itself without that being an echo."""
        return (*self.names.all(), *self.catchphrases, *self.protected_terms,
                *(example.assistant for example in self.example_dialogues), self.greeting,
                *self.fallback_lines)

    def _english_prompt(self, text: EnglishText) -> str:
        lines = [
            f"You are {self.names.en}, {text.identity}",
            f"Personality: {', '.join(text.traits)}." if text.traits else "",
            f"Style: {text.speaking_style}" if text.speaking_style else "",
            "Reply briefly and naturally (one to three sentences). Never speak for the viewer.",
        ]
        return "\n".join(line for line in lines if line)

    def tier_for(self, intimacy: float) -> IntimacyTier:
        current = self.intimacy.tiers[0]
        for tier in self.intimacy.tiers:
            if intimacy >= tier.min:
                current = tier
        return current

    def fallback(self, seed: int = 0) -> str:
        return self.fallback_lines[seed % len(self.fallback_lines)]


def load_persona(path: str | Path | None = None) -> Persona:
    """Load and validate a persona file; None loads the bundled character."""
    if path is None:
        text = files("engine").joinpath("personas", BUNDLED_PERSONA).read_text("utf-8")
        source = f"<bundled {BUNDLED_PERSONA}>"
    else:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PersonaError(f"vtuber.persona: cannot read {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
        return Persona.model_validate(data)
    except yaml.YAMLError as exc:
        raise PersonaError(f"{source}: invalid YAML: {exc}") from None
    except ValidationError as exc:
        problems = [
            f"{source}: {'.'.join(map(str, e['loc']))}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors(include_url=False)
        ]
        raise PersonaError("\n".join(problems)) from None


def knowledge_folder(persona: Persona, persona_path: str | Path | None) -> Path | None:
    """The persona's knowledge folder; a relative one is relative to the persona file."""
    if persona.knowledge_dir is None:
        return None
    folder = Path(persona.knowledge_dir).expanduser()
    if not folder.is_absolute():
        base = (Path(str(files("engine").joinpath("personas"))) if persona_path is None
                else Path(persona_path).resolve().parent)
        folder = base / folder
    if not folder.is_dir():
        raise PersonaError(f"knowledge_dir: folder not found: {folder}")
    return folder


@dataclass(frozen=True, slots=True)
class PersonaState:
    """One user's relationship with the persona (mirrors the store's row, no DB types)."""

    mood: str
    mood_intensity: float = 0.0
    intimacy: float = 0.0
    intimacy_gained_today: float = 0.0
    conversation_count: int = 0
    last_interaction_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class Transition:
    state: PersonaState
    cause: str
    details: dict[str, Any]


def _count_hits(text: str, words: list[str]) -> int:
    folded = text.casefold()
    return sum(folded.count(word.casefold()) for word in words if word)


def decay(state: PersonaState, now: datetime, persona: Persona) -> PersonaState:
    """Mood fades toward baseline; intimacy slowly fades after a grace period of absence."""
    if state.last_interaction_at is None:
        return state
    elapsed_s = max(0.0, (now - state.last_interaction_at).total_seconds())
    half_life_s = persona.moods.decay_half_life_minutes * 60
    intensity = state.mood_intensity * math.pow(0.5, elapsed_s / half_life_s)
    mood = state.mood if intensity >= 0.15 else persona.moods.baseline
    if mood == persona.moods.baseline:
        intensity = 0.0 if intensity < 0.15 else intensity
    absent_days = elapsed_s / 86400
    rules = persona.intimacy
    lost = max(0.0, absent_days - rules.grace_days) * rules.decay_per_day
    intimacy = max(0.0, state.intimacy - lost)
    gained_today = state.intimacy_gained_today
    if now.date() != state.last_interaction_at.date():
        gained_today = 0.0
    return replace(state, mood=mood, mood_intensity=round(intensity, 4),
                   intimacy=round(intimacy, 4), intimacy_gained_today=gained_today)


def detect_mood(text: str, persona: Persona) -> tuple[str | None, int]:
    best: tuple[str | None, int] = (None, 0)
    for name, mood in persona.moods.states.items():
        hits = sum(_count_hits(text, words) for words in mood.triggers.values())
        if hits > best[1]:
            best = (name, hits)
    return best


def advance(state: PersonaState, text: str, now: datetime, persona: Persona) -> Transition:
    """The state after one message from this user, with the cause of each change."""
    decayed = decay(state, now, persona)
    causes = []
    if decayed.intimacy < state.intimacy:
        causes.append(f"absence decay -{state.intimacy - decayed.intimacy:.2f}")
    mood, intensity = decayed.mood, decayed.mood_intensity
    triggered, hits = detect_mood(text, persona)
    if triggered is not None:
        mood, intensity = triggered, min(1.0, 0.5 + 0.25 * hits)
        causes.append(f"mood {triggered} ({hits} trigger(s))")
    rules = persona.intimacy
    positive = _count_hits(text, rules.positive_triggers)
    negative = _count_hits(text, rules.negative_triggers)
    wanted = rules.base_gain + positive * 1.0 - negative * 2.0
    delta = max(-rules.max_change_per_message, min(rules.max_change_per_message, wanted))
    if delta > 0:
        delta = min(delta, max(0.0, rules.daily_cap - decayed.intimacy_gained_today))
    intimacy = max(0.0, min(100.0, decayed.intimacy + delta))
    applied = intimacy - decayed.intimacy
    if applied:
        causes.append(f"intimacy {applied:+.2f}")
    elif wanted > 0:
        causes.append("intimacy daily cap reached")
    new = PersonaState(
        mood=mood,
        mood_intensity=round(intensity, 4),
        intimacy=round(intimacy, 4),
        intimacy_gained_today=round(decayed.intimacy_gained_today + max(0.0, applied), 4),
        conversation_count=state.conversation_count + 1,
        last_interaction_at=now,
    )
    details = {"positive_hits": positive, "negative_hits": negative, "mood_hits": hits,
               "tier": persona.tier_for(intimacy).name}
    return Transition(new, "; ".join(causes) or "message", details)


_CJK = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]")


def prompt_language(text: str) -> str:
    """"zh" when the message contains CJK characters, else "en"."""
    return "zh" if _CJK.search(text) else "en"


def state_hint(state: PersonaState, persona: Persona, language: str = "zh") -> str:
    """The per-user part of the system prompt."""
    mood = persona.moods.states.get(state.mood) or persona.moods.states[persona.moods.baseline]
    tier = persona.tier_for(state.intimacy)
    if language == "en":
        return f"Current mood: {state.mood}. Relationship with this viewer: {tier.name}."
    return f"現在的心情：{mood.hint}\n和這位觀眾的關係：{tier.hint}"
