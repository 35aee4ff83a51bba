"""Typed shapes of the engine's status reports (the seed's keys, as TypedDicts so callers
index them knowing what is there)."""

from __future__ import annotations

from typing import Any, TypedDict


class DeviceStatus(TypedDict):
    index: int
    name: str
    total_memory_gb: float
    available_memory_gb: float
    used_memory_gb: float


class PlacementReport(TypedDict):
    llm_device: str
    llm_gpus: list[int]
    llm_max_memory: dict[str, str]
    embedder_device: str
    notes: list[str]


class GpuStatus(TypedDict):
    """The seed's ``get_gpu_status`` keys, plus a per-device list."""

    gpu_count: int
    total_memory_gb: float
    available_memory_gb: float
    devices: list[DeviceStatus]
    cuda_visible_devices: str | None


class OptimizeReport(TypedDict):
    objects_collected: int
    freed_gb: float
    status: GpuStatus


class AllocationReport(TypedDict):
    layer_map: dict[str, str]
    modules_per_device: dict[str, int]
    placement: PlacementReport | None
    warnings: list[str]
    cuda_visible_devices: str | None


class SystemDiagnosis(TypedDict):
    issues: list[str]
    recommendations: list[str]
    system: dict[str, Any]
