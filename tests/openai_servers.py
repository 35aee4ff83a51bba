"""OpenAI-compatible servers the tests run as subprocesses: ``transformers serve`` and
vLLM's CPU build (the real scale-out engine, in its own venv: see the Makefile)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest


@contextlib.contextmanager
def served(command: list[str], port: int, env: dict[str, str], log: Path,
            seconds: float) -> Iterator[str]:
    """Run an OpenAI-compatible server in its own process group until it answers /health;
    yield its /v1 base URL; stop the whole group afterwards."""
    with log.open("w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   env=env, start_new_session=True)
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + seconds
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"{command[0]} exited; see {log}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server not healthy after {seconds:.0f} s; see {log}")
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.5)
            yield f"{base}/v1"
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout=60)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def vllm_server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM serving the bundled SmolLM2 on CPU until the generator is closed (the conftest's
    session fixture)."""
    python = os.environ.get("VTUBER_VLLM_PYTHON")
    if not python or not Path(python).exists():
        if os.environ.get("VTUBER_REQUIRE_VLLM"):
            pytest.fail("VTUBER_VLLM_PYTHON is not set or missing, and VTUBER_REQUIRE_VLLM is")
        pytest.skip("vLLM CPU venv not found (make test builds .venv-vllm and sets "
                    "VTUBER_VLLM_PYTHON)")
    from engine.model_loader import resolve_llm_dir

    model_dir = resolve_llm_dir(None, None, model_cache)  # the bundled SmolLM2, converted
    home = tmp_path_factory.mktemp("vllm")
    port = free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_CPU_KVCACHE_SPACE": "2",
           "TMPDIR": str(home), "VLLM_CACHE_ROOT": str(home / "cache"),
           "HF_HOME": str(home / "hf")}
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", "smollm2", "--host", "127.0.0.1", "--port", str(port),
               "--max-model-len", "2048", "--dtype", "bfloat16", "--enforce-eager"]
    with served(command, port, env, home / "server.log", 180) as url:
        yield url
