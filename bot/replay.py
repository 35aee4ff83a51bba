"""Replay stored conversations through the real conversation service.

A transcript is JSONL, one object per line:

- ``{"type": "message", "platform": "discord", "user": "ann", "name": "Ann", "channel": "c1",
  "text": "你好", "at": "2026-01-01T12:00:00+00:00", "reply": "(original, optional)",
  "expect": {"conversation_count": 1, "current_mood": "calm", "intimacy_level": 0.5}}``
- ``{"type": "restart"}`` closes and reopens the whole runtime (store and engine).
- ``{"type": "expect", "platform": "discord", "user": "ann", "stats": {...}}`` checks a user's
  stats at that point.

The clock is the transcript's: mood decay and intimacy caps see the recorded times.
Expectations: exact for counts and moods; ``intimacy_level`` within 0.01, or
``intimacy_min`` / ``intimacy_max`` bounds.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bot.config import AppConfig
from bot.errors import BotError
from bot.events import ChatEvent
from bot.paths import DataPaths
from bot.runtime import Runtime, open_runtime
from bot.signals import Observer
from engine.backends.base import Backend
from memory.store import Store

INTIMACY_TOLERANCE = 0.01


class TranscriptError(BotError):
    """A transcript line is not valid (names the file and line)."""

    exit_code = 65  # EX_DATAERR


@dataclass
class ReplayedMessage:
    at: datetime
    platform: str
    user: str
    text: str
    original: str | None
    new: str
    status: str
    stats: dict[str, Any]
    previous: dict[str, Any]
    retrieved: list[int]
    latency_s: float
    mismatches: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"at": self.at.isoformat(), "platform": self.platform, "user": self.user,
                "text": self.text, "original": self.original, "new": self.new,
                "status": self.status, "stats": self.stats, "retrieved": self.retrieved,
                "latency_s": round(self.latency_s, 3), "mismatches": self.mismatches}


@dataclass
class ReplayReport:
    messages: list[ReplayedMessage] = field(default_factory=list)
    checks: int = 0
    mismatches: list[str] = field(default_factory=list)
    final_stats: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.mismatches

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checks": self.checks, "mismatches": self.mismatches,
                "messages": [m.as_dict() for m in self.messages],
                "final_stats": self.final_stats}


def _parse_time(value: Any, where: str) -> datetime:
    try:
        moment = datetime.fromisoformat(str(value))
    except ValueError:
        raise TranscriptError(f"{where}: 'at' is not an ISO-8601 time: {value!r}") from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def read_transcript(path: Path) -> list[dict[str, Any]]:
    events = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise TranscriptError(f"{path}: cannot read: {exc.strerror}") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("//"):
            continue
        where = f"{path}:{number}"
        try:
            event = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TranscriptError(f"{where}: invalid JSON: {exc.msg}") from None
        kind = event.get("type", "message") if isinstance(event, dict) else None
        if kind == "message":
            missing = [k for k in ("platform", "user", "text", "at") if k not in event]
            if missing:
                raise TranscriptError(f"{where}: message lacks {', '.join(missing)}")
            event["at"] = _parse_time(event["at"], where)
        elif kind == "expect":
            if not {"platform", "user", "stats"} <= set(event):
                raise TranscriptError(f"{where}: expect needs platform, user and stats")
        elif kind != "restart":
            raise TranscriptError(f"{where}: unknown type {kind!r} "
                                  "(message, restart or expect)")
        event["type"] = kind
        event["_where"] = where
        events.append(event)
    return events


def compare(stats: dict[str, Any], expected: dict[str, Any], where: str) -> list[str]:
    """Mismatch lines for one expectation."""
    problems = []
    for key, want in expected.items():
        if key == "intimacy_min":
            if stats["intimacy_level"] < want:
                problems.append(f"{where}: intimacy {stats['intimacy_level']} < min {want}")
        elif key == "intimacy_max":
            if stats["intimacy_level"] > want:
                problems.append(f"{where}: intimacy {stats['intimacy_level']} > max {want}")
        elif key == "intimacy_level":
            if abs(float(stats[key]) - float(want)) > INTIMACY_TOLERANCE:
                problems.append(f"{where}: intimacy_level {stats[key]} != {want}")
        elif stats.get(key) != want:
            problems.append(f"{where}: {key} {stats.get(key)!r} != {want!r}")
    return problems


class _CaptureSink:
    def __init__(self) -> None:
        self.sent: list[str] = []
        self._ids = itertools.count(1)

    async def send(self, text: str) -> str:
        self.sent.append(text)
        return f"replay-{next(self._ids)}"

    async def edit(self, message_id: str, text: str) -> None:
        self.sent.append(text)

    async def typing(self) -> None:
        return None


_ZERO = {"conversation_count": 0, "current_mood": None, "intimacy_level": 0.0}


async def _stats_of(runtime: Runtime, platform: str, user: str) -> dict[str, Any]:
    """A viewer's stats as a plain dict (zeros for a viewer not seen yet)."""
    stats = await runtime.stats(platform, user)
    return dict(stats) if stats is not None else dict(_ZERO)


class _Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


async def _message(runtime: Runtime, clock: _Clock, event: dict[str, Any],
                   report: ReplayReport) -> None:
    clock.now = event["at"]
    user = str(event["user"])
    previous = await _stats_of(runtime, event["platform"], user)
    sink = _CaptureSink()
    started = time.perf_counter()
    reply = await runtime.service.handle(ChatEvent(
        platform=event["platform"], channel_id=str(event.get("channel", "replay")),
        platform_user_id=user, display_name=str(event.get("name", user)), text=event["text"],
        sink=sink, timestamp=event["at"],
    ))
    latency = time.perf_counter() - started
    stats = await _stats_of(runtime, event["platform"], user)
    retrieved: list[int] = []
    if reply.message_id is not None:
        message = await runtime.store.get_message(reply.message_id)
        trace = (message.trace or {}) if message else {}
        retrieved = [chunk["id"] for chunk in trace.get("retrieved", [])]
    item = ReplayedMessage(event["at"], event["platform"], user, event["text"],
                           event.get("reply"), reply.text, reply.status, stats, previous,
                           retrieved, latency)
    if "expect" in event:
        report.checks += 1
        item.mismatches = compare(stats, event["expect"], event["_where"])
        report.mismatches += item.mismatches
    report.messages.append(item)


async def replay(
    events: Iterable[dict[str, Any]],
    config: AppConfig,
    paths: DataPaths,
    *,
    backend: Backend | None = None,
    on_message: Callable[[int, int, ReplayedMessage], None] | None = None,
    observers: Sequence[Observer] = (),
) -> ReplayReport:
    """Run the events through the real service against the database in ``paths``;
    ``on_message(done, total, message)`` after each message (progress); ``observers`` hear
    the service's signals, as the operator server's metrics do in a live run."""
    report = ReplayReport()
    clock = _Clock()
    pending = list(events)
    total = sum(1 for e in pending if e["type"] == "message")
    users: set[tuple[str, str]] = set()
    while True:
        async with open_runtime(config, paths, backend=backend, clock=clock) as runtime:
            for observer in observers:
                runtime.service.signals.connect(observer)
            while pending:
                event = pending.pop(0)
                if event["type"] == "restart":
                    break
                if event["type"] == "expect":
                    stats = await _stats_of(runtime, event["platform"], str(event["user"]))
                    report.checks += 1
                    report.mismatches += compare(stats, event["stats"], event["_where"])
                    continue
                users.add((event["platform"], str(event["user"])))
                await _message(runtime, clock, event, report)
                if on_message is not None:
                    on_message(len(report.messages), total, report.messages[-1])
            for platform, user in sorted(users):
                report.final_stats[f"{platform}:{user}"] = await _stats_of(runtime, platform,
                                                                           user)
        if not pending:
            return report
        backend = None  # a restart builds a new engine, as a real restart would


async def export_transcript(store: Store, persona_id: str, default_mood: str, *,
                            platform: str | None = None, user: str | None = None,
                            channel: str | None = None,
                            since: datetime | None = None) -> list[dict[str, Any]]:
    """Answered messages (with their original replies) as transcript lines, then one
    ``expect`` line per user holding the state stored now."""
    rows = await store.transcript_rows(persona_id, platform=platform, platform_user_id=user,
                                       channel_id=channel, since=since)
    lines: list[dict[str, Any]] = []
    seen: dict[tuple[str, str], None] = {}
    for row in rows:
        seen[(row["platform"], row["user"])] = None
        lines.append({"type": "message", **row})
    for platform_name, user_id in seen:
        stats = await store.stats(platform_name, user_id, persona_id, default_mood)
        if stats is not None:
            lines.append({"type": "expect", "platform": platform_name, "user": user_id,
                          "stats": {k: stats[k] for k in ("conversation_count",
                                                          "current_mood", "intimacy_level")}})
    return lines


def format_report(report: ReplayReport) -> str:
    """Side by side, one block per message: what was said, both replies, state, retrieval."""
    out = []
    for m in report.messages:
        before, after = m.previous, m.stats
        out.append(f"[{m.at:%Y-%m-%d %H:%M}] {m.platform}:{m.user}: {m.text}")
        if m.original is not None:
            out.append(f"    original: {m.original}")
        out.append(f"    new:      {m.new}   ({m.status}, {m.latency_s:.2f} s)")
        out.append(
            f"    mood {before.get('current_mood') or '-'} → {after.get('current_mood')}, "
            f"intimacy {before.get('intimacy_level', 0.0):.2f} → "
            f"{after.get('intimacy_level', 0.0):.2f}, "
            f"conversations {after.get('conversation_count')}, retrieved {m.retrieved}"
        )
        out.extend(f"    MISMATCH {problem}" for problem in m.mismatches)
    out.append(f"{len(report.messages)} messages, {report.checks} expectations checked, "
               f"{len(report.mismatches)} mismatched")
    out.extend(f"MISMATCH {problem}" for problem in report.mismatches
               if not any(problem in m.mismatches for m in report.messages))
    return "\n".join(out)
