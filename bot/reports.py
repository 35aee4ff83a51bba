"""Typed reports the runtime hands to commands and adapters (no ``dict[str, Any]`` indexing
by guesswork)."""

from __future__ import annotations

from typing import Any, TypedDict

from engine.reports import GpuStatus, PlacementReport, SystemDiagnosis
from memory.store import UserStats


class ViewerStats(UserStats):
    """A viewer's stats: the seed's keys plus the intimacy tier and its weekly trend."""

    intimacy_tier: str
    intimacy_trend: str  # rising | falling | steady


class RuntimeGpuStatus(GpuStatus):
    model: str
    loading_mode: str | None
    placement: PlacementReport | None


class LatencySummary(TypedDict):
    p50: float | None
    p95: float | None
    samples: int


class RuntimeDiagnosis(SystemDiagnosis):
    engine_config: dict[str, Any]  # the settings the running engine holds (no secrets)
    model: dict[str, Any]
    allocation_warnings: list[str]
    queue_depth: int
    latency_ms: LatencySummary


class PersonaInfo(TypedDict):
    id: str
    names: dict[str, str]
    call_names: list[str]
    identity: str
    disclosure: str


class ReplyTrace(TypedDict):
    message_id: int
    reply_to: int | None
    channel_id: str | None
    content: str
    trace: dict[str, Any]
