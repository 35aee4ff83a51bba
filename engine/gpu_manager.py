"""GPU discovery, status, placement policy and memory housekeeping. Works with no GPU at all.

Placement (the seed's policy): the LLM spreads over the first up-to-4 GPUs through a
``max_memory`` map; the embedder sits on the 5th GPU, else on the last one (shared with the LLM
when there is only one); everything on CPU without CUDA. The policy is a pure function of a
device list, so it is tested with faked devices.
"""

from __future__ import annotations

import gc
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from engine.reports import (
    AllocationReport,
    DeviceStatus,
    GpuStatus,
    OptimizeReport,
    PlacementReport,
)

log = logging.getLogger(__name__)

GIB = 1024**3
MAX_LLM_GPUS = 4
# Headroom left on each GPU for activations and the KV cache.
DEFAULT_RESERVE_FRACTION = 0.10


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    index: int
    name: str
    total_bytes: int
    free_bytes: int

    def as_dict(self) -> DeviceStatus:
        used = self.total_bytes - self.free_bytes
        return {
            "index": self.index,
            "name": self.name,
            "total_memory_gb": round(self.total_bytes / GIB, 2),
            "available_memory_gb": round(self.free_bytes / GIB, 2),
            "used_memory_gb": round(used / GIB, 2),
        }


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the models go. ``llm_max_memory`` keys are GPU indexes or "cpu"."""

    llm_device: str
    llm_gpus: tuple[int, ...] = ()
    llm_max_memory: dict[int | str, str] = field(default_factory=dict)
    embedder_device: str = "cpu"
    notes: tuple[str, ...] = ()
    # Module name -> GPU for a model split over several GPUs (None: accelerate's "auto").
    layer_map: dict[str, int] | None = None

    @property
    def device_map(self) -> str | None:
        return "auto" if len(self.llm_gpus) > 1 else None

    def as_dict(self) -> PlacementReport:
        return {
            "llm_device": self.llm_device,
            "llm_gpus": list(self.llm_gpus),
            "llm_max_memory": {str(k): v for k, v in self.llm_max_memory.items()},
            "embedder_device": self.embedder_device,
            "notes": list(self.notes),
        }


def _torch() -> Any | None:
    try:
        import torch
    except ImportError:  # the engine still answers status questions without torch
        return None
    return torch


def discover_devices() -> list[DeviceInfo]:
    torch = _torch()
    if torch is None or not torch.cuda.is_available():
        return []
    devices = []
    for index in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(index)
        devices.append(DeviceInfo(index, torch.cuda.get_device_name(index), total, free))
    return devices


def plan_placement(
    devices: list[DeviceInfo],
    requested: str = "auto",
    reserve_fraction: float = DEFAULT_RESERVE_FRACTION,
) -> Placement:
    """Decide where the LLM and the embedder go, given the visible devices."""
    if requested == "cpu" or not devices:
        note = "no CUDA device visible; using CPU" if requested != "cpu" else "device: cpu"
        return Placement(llm_device="cpu", embedder_device="cpu", notes=(note,))
    if requested.startswith("cuda:"):
        index = int(requested.split(":", 1)[1])
        if index >= len(devices):
            raise ValueError(
                f"models.llm.device: {requested!r} but only {len(devices)} GPU(s) are visible"
            )
        return Placement(llm_device=requested, llm_gpus=(index,),
                         embedder_device=requested, notes=(f"pinned to {requested}",))
    llm_gpus = tuple(d.index for d in devices[:MAX_LLM_GPUS])
    max_memory: dict[int | str, str] = {
        d.index: f"{int(d.total_bytes * (1 - reserve_fraction) / GIB)}GiB"
        for d in devices[:MAX_LLM_GPUS]
    }
    if len(devices) > MAX_LLM_GPUS:
        embedder = devices[MAX_LLM_GPUS].index
        note = f"LLM on GPUs {list(llm_gpus)}, embedder alone on GPU {embedder}"
    else:
        embedder = devices[-1].index
        note = (f"LLM on GPUs {list(llm_gpus)}, embedder shares GPU {embedder} "
                f"(fewer than {MAX_LLM_GPUS + 1} GPUs)")
    return Placement(
        llm_device=f"cuda:{llm_gpus[0]}",
        llm_gpus=llm_gpus,
        llm_max_memory=max_memory,
        embedder_device=f"cuda:{embedder}",
        notes=(note,),
    )


def gpu_status(devices: list[DeviceInfo] | None = None) -> GpuStatus:
    """The seed's ``get_gpu_status`` shape, plus a per-device list."""
    devices = discover_devices() if devices is None else devices
    return {
        "gpu_count": len(devices),
        "total_memory_gb": round(sum(d.total_bytes for d in devices) / GIB, 2),
        "available_memory_gb": round(sum(d.free_bytes for d in devices) / GIB, 2),
        "devices": [d.as_dict() for d in devices],
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }


def optimize_gpu_memory() -> OptimizeReport:
    """Collect garbage and return cached CUDA blocks to the driver; report what was freed."""
    before = gpu_status()
    collected = gc.collect()
    torch = _torch()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.ipc_collect()
    after = gpu_status()
    freed = round(after["available_memory_gb"] - before["available_memory_gb"], 3)
    log.info("GPU memory optimised: %s objects collected, %.3f GiB freed", collected, freed)
    return {"objects_collected": collected, "freed_gb": freed, "status": after}


def layer_device_map(model: Any) -> dict[str, str]:
    """Which device holds which module (accelerate's map, else each parameter's device)."""
    mapping = getattr(model, "hf_device_map", None)
    if mapping:
        # accelerate names GPUs by bare index (0, 1, ...); say "cuda:0" like torch does.
        return {str(name): f"cuda:{device}" if isinstance(device, int) else str(device)
                for name, device in mapping.items()}
    result: dict[str, str] = {}
    for name, param in model.named_parameters():
        top = ".".join(name.split(".")[:3])
        result.setdefault(top, str(param.device))
    return result


def diagnose_allocation(model: Any | None, placement: Placement | None = None,
                        imbalance_ratio: float = 2.0) -> AllocationReport:
    """Layer → device map with imbalance warnings (a GPU holding far more layers than another)."""
    warnings: list[str] = []
    layer_map = layer_device_map(model) if model is not None else {}
    counts = Counter(layer_map.values())
    gpu_counts = {dev: n for dev, n in counts.items() if dev not in ("cpu", "disk", "meta")}
    if len(gpu_counts) > 1:
        most, least = max(gpu_counts.values()), min(gpu_counts.values())
        if least and most / least > imbalance_ratio:
            warnings.append(f"layer imbalance across GPUs: {dict(gpu_counts)}")
    if counts.get("cpu") and gpu_counts:
        warnings.append(f"{counts['cpu']} module(s) offloaded to CPU: generation will be slow")
    if counts.get("disk"):
        warnings.append(f"{counts['disk']} module(s) offloaded to disk")
    if model is None:
        warnings.append("no LLM loaded in-process (scripted/openai backend or not initialised)")
    return {
        "layer_map": layer_map,
        "modules_per_device": dict(counts),
        "placement": placement.as_dict() if placement else None,
        "warnings": warnings,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
    }
