"""Which of a viewer's recent messages go into their prompt: a window that moves in steps.

An engine with a prefix cache (vLLM's, or the in-process one's) reuses a returning viewer's
prompt up to the first token that differs from their last one. A window of "the newest
messages that fit" moves by one exchange with every message, so their prompts differed right
after the persona and nothing of their history was ever reused. Here the window keeps its
first message while the viewer talks, growing, and only when it no longer fits (or its first
message left the messages read) does it move, to the newest half: the prompt's start then
stays the same for the next several messages.

Invariants: the window is the newest messages of what was read, contiguous (but for an
exchange holding a message longer than the whole budget, which is left out), within the token
budget, starting on a viewer's turn; per viewer one remembered start, for at most
``max_viewers`` viewers (the least recently seen are forgotten: their next window starts
afresh, which costs only a cache miss).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Protocol, TypeVar


class _Message(Protocol):
    @property
    def id(self) -> int: ...

    @property
    def role(self) -> str: ...

    @property
    def content(self) -> str: ...


M = TypeVar("M", bound=_Message)
# Messages whose token count is remembered: tokenizing is most of a window's cost, on the event
# loop, and a viewer's window holds the same messages message after message.
COUNTS_KEPT = 50_000


class HistoryWindows:
    def __init__(self, token_budget: int, count_tokens: Callable[[str], int],
                 max_viewers: int = 10_000) -> None:
        self._budget = token_budget
        self._count = count_tokens
        self._max_viewers = max_viewers
        self._starts: OrderedDict[int, int] = OrderedDict()  # viewer → first message id kept
        # (id, text) → tokens: the text too, since a deleted message's id may come back
        self._counts: dict[tuple[int, str], int] = {}

    def window(self, viewer: int | None, history: Sequence[M]) -> list[M]:
        """The part of ``history`` (oldest first, as read) this viewer's prompt gets."""
        start = self._starts.get(viewer) if viewer is not None else None
        if start is None:  # first seen here: all that fits
            kept = self._newest(history, self._budget, len(history))
        elif history and history[0].id <= start and self._fits(
                kept := [m for m in history if m.id >= start]):
            pass  # the same start as last time
        else:  # it no longer fits: move on, to the newest half
            kept = self._newest(history, self._budget // 2, len(history) // 2)
        kept = _from_a_user_turn(kept)
        if kept:
            self._remember(viewer, kept[0].id)
        return kept

    def _fits(self, messages: Sequence[M]) -> bool:
        return sum(self._cost(m) for m in messages) <= self._budget

    def _cost(self, message: _Message) -> int:
        key = (message.id, message.content)
        cost = self._counts.get(key)
        if cost is None:
            cost = self._counts[key] = self._count(message.content)
            if len(self._counts) > COUNTS_KEPT:  # the oldest first (insertion order)
                del self._counts[next(iter(self._counts))]
        return cost

    def _newest(self, history: Sequence[M], budget: int, count: int) -> list[M]:
        kept: list[M] = []
        used = 0
        for item in reversed(_without_oversized(history, self._cost, budget)):
            cost = self._cost(item)
            if used + cost > budget or len(kept) == count:
                break
            kept.append(item)
            used += cost
        kept.reverse()
        return kept

    def _remember(self, viewer: int | None, start: int) -> None:
        if viewer is None:
            return
        self._starts[viewer] = start
        self._starts.move_to_end(viewer)
        while len(self._starts) > self._max_viewers:
            self._starts.popitem(last=False)


def _without_oversized(history: Sequence[M], cost: Callable[[_Message], int],
                       budget: int) -> list[M]:
    """``history`` without the exchanges (a viewer's message and the reply to it) that hold a
    message too long for the budget on its own: one long paste must not empty the window."""
    too_long = {i for i, m in enumerate(history) if cost(m) > budget}
    for index in list(too_long):
        partner = index + 1 if history[index].role == "user" else index - 1
        if 0 <= partner < len(history) and history[partner].role != history[index].role:
            too_long.add(partner)
    return [m for i, m in enumerate(history) if i not in too_long]


def _from_a_user_turn(messages: list[M]) -> list[M]:
    first = next((i for i, m in enumerate(messages) if m.role == "user"), len(messages))
    return messages[first:]
