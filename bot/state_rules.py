"""The bridge between the engine's pure persona rules and the store's atomic state update.

The engine's ``PersonaState`` and the store's ``StateSnapshot`` carry the same fields (engine
and memory may not import each other); this module translates between them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from datetime import datetime

from engine.persona import Persona, PersonaState, advance
from memory.store import StateChange, StateSnapshot

_STATE_FIELDS = tuple(f.name for f in fields(PersonaState))


def to_persona_state(snapshot: StateSnapshot) -> PersonaState:
    return PersonaState(**{name: getattr(snapshot, name) for name in _STATE_FIELDS})


def persona_rule(persona: Persona, text: str,
                 now: datetime) -> Callable[[StateSnapshot], StateChange]:
    """Adapt the engine's pure persona rule to the store's atomic read-modify-write."""

    def rule(before: StateSnapshot) -> StateChange:
        transition = advance(to_persona_state(before), text, now, persona)
        new = {name: getattr(transition.state, name) for name in _STATE_FIELDS}
        return StateChange(new=StateSnapshot(**new, version=before.version),
                           cause=transition.cause, details=transition.details)

    return rule
