"""The CLI as a user runs it: real processes, in a network namespace with no network when the
machine allows one (``unshare -n``), else with the in-process guard only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from functools import cache
from pathlib import Path

import pytest

from memory.store import Store
from tests import secret_guard
from tests.cli_logging import root_logging_restored
from tests.read_only import run_read_only
from tests.store_reads import messages_for

SCRIPTED = """
models:
  llm:
    backend: scripted
    scripted:
      replies: ["Nice to meet you!", "I remember you said hi."]
  embedding:
    enabled: false
"""


@cache
def _offline_prefix() -> tuple[str, ...]:
    unshare = shutil.which("unshare")
    if unshare is None:
        return ()
    for flags in (("-n",), ("-rn",)):
        probe = subprocess.run([unshare, *flags, "true"], capture_output=True, check=False)
        if probe.returncode == 0:
            return (unshare, *flags)
    return ()


def vtuber(*args: str, stdin: str | None = None, cwd: Path | None = None,
           env: dict[str, str] | None = None, timeout: float = 120
           ) -> subprocess.CompletedProcess[str]:
    command = [*_offline_prefix(), sys.executable, "-m", "bot", *args]
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    result = subprocess.run(command, input=stdin, capture_output=True, text=True, cwd=cwd,
                            env=full_env, timeout=timeout, check=False)
    secret_guard.observe_process(env, result.stdout, result.stderr)
    return result


@pytest.fixture
def scripted_config(tmp_path: Path) -> Path:
    path = tmp_path / "scripted.yaml"
    path.write_text(SCRIPTED, encoding="utf-8")
    return path


def test_chat_once_twice_then_stats(tmp_path: Path, scripted_config: Path) -> None:
    data = tmp_path / "data"
    common = ("--config", str(scripted_config), "--data-dir", str(data))
    first = vtuber(*common, "chat", "--once", "hi")
    assert first.returncode == 0, first.stderr
    assert first.stdout.strip() == "Nice to meet you!"
    assert str(data) in first.stderr  # the data dir is stated at start
    second = vtuber(*common, "chat", "--once", "hi again")
    assert second.returncode == 0, second.stderr
    stats = vtuber(*common, "stats", "--platform", "console", "--user", "viewer", "--json")
    assert stats.returncode == 0, stats.stderr
    payload = json.loads(stats.stdout)
    assert payload["conversation_count"] == 2
    assert {"current_mood", "intimacy_level"} <= set(payload)
    # The second reply's prompt contained the first exchange.
    messages = asyncio.run(_messages(data / "vtuber.db"))
    first_ids = [m.id for m in messages[:2]]
    assert [m.content for m in messages[:2]] == ["hi", "Nice to meet you!"]
    assert messages[3].trace is not None
    assert messages[3].trace["history_message_ids"] == first_ids


async def _messages(db: Path) -> list:
    store = await Store.open(f"sqlite+aiosqlite:///{db}")
    try:
        user_id = await store.find_user("console", "viewer")
        assert user_id is not None
        return await messages_for(store, user_id)
    finally:
        await store.close()


def test_repl_quit_and_eof_exit_zero(tmp_path: Path, scripted_config: Path) -> None:
    common = ("--config", str(scripted_config), "--data-dir", str(tmp_path / "d"))
    quit_run = vtuber(*common, "chat", "--user", "ann", stdin="hello\n/stats\n/quit\n")
    assert quit_run.returncode == 0, quit_run.stderr
    assert "Nice to meet you!" in quit_run.stdout
    assert "conversations: 1" in quit_run.stdout
    eof_run = vtuber(*common, "chat", "--user", "ann", stdin="hello again\n")
    assert eof_run.returncode == 0, eof_run.stderr
    assert eof_run.stdout.count("Nice to meet you!") == 1  # a new process, a new script


def test_a_chat_with_the_model_in_an_engine_process(tmp_path: Path,
                                                   tiny_model_dir: Path) -> None:
    """The console on a local model in an engine process of its own: the reply comes from
    it, the engine's log lines reach the runtime's log, and the engine process is gone once
    the runtime has exited."""
    config = tmp_path / "engine-process.yaml"
    config.write_text(
        "models:\n  llm:\n    model_path: " + str(tiny_model_dir) + "\n    device: cpu\n"
        "    continuous_batching: 'on'\n    engine_process: 'on'\n"
        "  embedding:\n    enabled: false\n"
        "vtuber:\n  response:\n    max_tokens: 8\n", encoding="utf-8")
    result = vtuber("--config", str(config), "--data-dir", str(tmp_path / "d"), "chat",
                    "--user", "ann", stdin="hello there\n/stats\n/quit\n")
    assert result.returncode == 0, result.stderr
    assert "conversations: 1" in result.stdout
    assert "LLM loaded from" in result.stderr  # written by the engine process
    [pid] = re.findall(r"engine process (\d+) ready", result.stderr)
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid), 0)


def test_sigterm_exits_zero(tmp_path: Path, scripted_config: Path) -> None:
    command = [sys.executable, "-m", "bot", "--config", str(scripted_config), "--data-dir",
               str(tmp_path / "d"), "chat"]
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    deadline = time.monotonic() + 60
    banner = ""
    while "Commands:" not in banner and time.monotonic() < deadline:
        banner += process.stdout.readline()
    process.send_signal(signal.SIGTERM)
    _out, err = process.communicate(timeout=30)
    assert process.returncode == 0, err
    assert "Traceback" not in err


def test_bad_config_three_lines_exit_78(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "models:\n  llm:\n    temperature: 9\n    quantization: 3bit\n"
        "adapters:\n  discrod:\n    enabled: true\n",
        encoding="utf-8",
    )
    result = vtuber("--config", str(bad), "run")
    assert result.returncode == 78
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 3, result.stderr
    assert any("models.llm.temperature: 9" in line for line in lines)
    assert any("models.llm.quantization: '3bit'" in line and "4bit" in line for line in lines)
    assert any("adapters.discrod: unknown key" in line for line in lines)


def test_missing_discord_token_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "discord.yaml"
    config.write_text("adapters:\n  console:\n    enabled: false\n  discord:\n    enabled: true\n",
                      encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    command = [*_offline_prefix(), sys.executable, "-m", "bot", "--config", str(config),
               "--data-dir", str(tmp_path / "d"), "run"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60,
                            check=False)
    assert result.returncode == 78
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert errors == ["config error: adapters.discord.enabled is true but the environment "
                      "variable DISCORD_TOKEN is not set"]
    assert "Traceback" not in result.stderr


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_run_with_discord_unreachable_is_one_line_exit_69(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    discord = pytest.importorskip("discord")
    from bot import cli

    config = tmp_path / "discord.yaml"
    config.write_text(SCRIPTED + "adapters:\n  console: {enabled: false}\n"
                      "  discord: {enabled: true}\n",
                      encoding="utf-8")
    monkeypatch.setenv("DISCORD_TOKEN", "discord-token-cli-7731")
    # In-process, so that the client can be pointed at a local port nobody listens on.
    monkeypatch.setattr(discord.http.Route, "BASE", f"http://127.0.0.1:{_closed_port()}/api")
    with root_logging_restored():
        code = cli.main(["--config", str(config), "--data-dir", str(tmp_path / "d"), "run"])
    err = capsys.readouterr().err
    assert code == 69, err
    assert "error: cannot reach Discord (ClientConnectorError): check the network" in err
    assert "Traceback" not in err and "discord-token-cli-7731" not in err


def test_run_with_nothing_enabled(tmp_path: Path) -> None:
    config = tmp_path / "none.yaml"
    config.write_text("adapters:\n  console:\n    enabled: false\n", encoding="utf-8")
    result = vtuber("--config", str(config), "--data-dir", str(tmp_path / "d"), "run")
    assert result.returncode == 78
    assert "no adapter is enabled" in result.stderr


def test_gpu_status_without_gpu(tmp_path: Path) -> None:
    result = vtuber("--data-dir", str(tmp_path), "gpu-status", "--json")
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    assert status["gpu_count"] == 0
    assert status["placement"]["llm_device"] == "cpu"


def test_diagnose_json_masks_secrets(tmp_path: Path) -> None:
    result = vtuber("--data-dir", str(tmp_path), "diagnose", "--json",
                    env={"DISCORD_TOKEN": "super-secret-token"})
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert {"issues", "recommendations", "system"} <= set(report)
    assert "super-secret-token" not in result.stdout
    assert report["config"]["secrets"]["discord_token"] == "***"


def test_migrate_and_not_a_database(tmp_path: Path) -> None:
    result = vtuber("--data-dir", str(tmp_path), "migrate")
    assert result.returncode == 0, result.stderr
    assert "is at revision" in result.stdout
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "vtuber.db").write_text("not sqlite", encoding="utf-8")
    result = vtuber("--data-dir", str(junk), "stats", "--platform", "console", "--user", "x")
    assert result.returncode == 1
    assert "not a SQLite database" in result.stderr
    assert (junk / "vtuber.db").read_text(encoding="utf-8") == "not sqlite"


@pytest.mark.slow
def test_bundled_model_answers_in_the_repl(tmp_path: Path, model_cache: Path) -> None:
    """Acceptance: the embedded default answers 你好 and hello within 60 s each on 2 cores,
    first run (model conversion) included."""
    started = time.monotonic()
    result = vtuber("--data-dir", str(tmp_path / "d"), "chat",
                    stdin="你好\nhello\n/quit\n", env={"VTUBER_CACHE_DIR": str(model_cache)},
                    cwd=tmp_path, timeout=180)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    replies = re.findall(r"燈芯佩兒> (.*)", result.stdout)
    assert len(replies) == 2, result.stdout
    assert all(reply.strip() for reply in replies)
    assert elapsed < 120, f"two replies took {elapsed:.0f} s"
    assert "Preparing SmolLM2" in result.stderr  # progress is shown on first use


def test_locked_database_is_one_line_and_nonzero(tmp_path: Path) -> None:
    import sqlite3

    data = tmp_path / "d"
    assert vtuber("--data-dir", str(data), "migrate").returncode == 0
    config = tmp_path / "fast.yaml"
    config.write_text("store:\n  busy_timeout_ms: 300\n", encoding="utf-8")
    holder = sqlite3.connect(data / "vtuber.db", isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        result = vtuber("--config", str(config), "--data-dir", str(data), "stats",
                        "--platform", "console", "--user", "viewer")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "locked" in errors[0], result.stderr
    assert "Traceback" not in result.stderr


def test_read_only_database_is_one_line_and_untouched(tmp_path: Path) -> None:
    """A read-only file system (even root cannot write there)."""
    data = tmp_path / "ro"
    assert vtuber("--data-dir", str(data), "migrate").returncode == 0
    before = (data / "vtuber.db").read_bytes()
    result = run_read_only(data, [sys.executable, "-m", "bot", "--data-dir", str(data),
                                  "stats", "--platform", "console", "--user", "viewer"])
    assert result.returncode == 1, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "read-only" in errors[0], result.stderr
    assert (data / "vtuber.db").read_bytes() == before


def test_chat_once_that_fails_exits_1_with_one_line(
        tmp_path: Path, scripted_config: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The store fails the message (a full disk, say): the viewer sees the fallback, and a
    script calling `chat --once` sees exit 1 and one line saying why."""
    from bot import cli
    from memory.errors import StoreError

    async def full_disk(*_: object, **__: object) -> None:
        raise StoreError("store: database or disk is full")

    monkeypatch.setattr(Store, "intake", full_disk)
    with root_logging_restored():
        code = cli.main(["--config", str(scripted_config), "--data-dir", str(tmp_path / "d"),
                         "chat", "--once", "hello"])
    captured = capsys.readouterr()
    assert code == 1
    assert captured.out.strip()  # the in-character fallback
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert errors == ["error: the message ended failed (store)"], captured.err
    assert "Traceback" not in captured.err


def test_global_options_work_after_the_sub_command(tmp_path: Path,
                                                   scripted_config: Path) -> None:
    """`make run ARGS="--config x.yaml"` puts them after `chat`."""
    result = vtuber("chat", "--config", str(scripted_config), "--data-dir",
                    str(tmp_path / "d"), "--once", "hi")
    assert result.returncode == 0, result.stderr
    assert "Nice to meet you!" in result.stdout
    assert (tmp_path / "d" / "vtuber.db").exists()


def test_usage_mistakes_are_one_line_exit_2(tmp_path: Path) -> None:
    typo = vtuber("--data-dir", str(tmp_path), "stats", "--platform", "dicsord", "--user", "x")
    assert typo.returncode == 2
    assert "invalid choice: 'dicsord' (choose from 'console', 'discord', 'twitch')" in typo.stderr
    since = vtuber("--data-dir", str(tmp_path), "export-transcript", "--since", "yesterday")
    assert since.returncode == 2
    assert "'yesterday' is neither an ISO-8601 time" in since.stderr
    assert "Traceback" not in typo.stderr + since.stderr
    recent = vtuber("--data-dir", str(tmp_path), "export-transcript", "--since", "24h")
    assert recent.returncode == 0, recent.stderr


def test_a_data_dir_that_cannot_be_created_is_one_line_exit_73(tmp_path: Path) -> None:
    blocker = tmp_path / "taken"
    blocker.write_text("a file, not a folder", encoding="utf-8")
    result = vtuber("--data-dir", str(blocker), "chat", "--once", "hi")
    assert result.returncode == 73
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: data dir {blocker}: a file is in the way (choose another "
                      "--data-dir)"]
    assert "Traceback" not in result.stderr


@contextlib.contextmanager
def _chat_running(config: Path, data_dir: Path) -> Iterator[subprocess.Popen[str]]:
    """A `chat` REPL running in a subprocess (killed, like kill -9, when the block ends)."""
    first = subprocess.Popen(
        [sys.executable, "-m", "bot", "--config", str(config), "--data-dir", str(data_dir),
         "chat"], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        text=True)
    try:
        assert first.stdout is not None
        deadline = time.monotonic() + 60
        while "/quit" not in first.stdout.readline():  # the help line: the REPL is up
            assert time.monotonic() < deadline
        yield first
    finally:
        first.kill()
        first.wait(timeout=10)


def test_a_second_runtime_on_one_data_dir_is_refused(tmp_path: Path,
                                                     scripted_config: Path) -> None:
    data = tmp_path / "d"
    with _chat_running(scripted_config, data) as first:
        second = vtuber("--config", str(scripted_config), "--data-dir", str(data), "chat",
                        "--once", "hi")
    assert second.returncode == 75
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"(pid {first.pid})" in errors[0], second.stderr
    assert str(data) in errors[0]
    # The lock went with the killed process: a restart is not blocked by a stale file.
    again = vtuber("--config", str(scripted_config), "--data-dir", str(data), "chat",
                   "--once", "hi")
    assert again.returncode == 0, again.stderr


def test_forget_and_export_one_viewer_from_the_cli(tmp_path: Path,
                                                   scripted_config: Path) -> None:
    common = ("--config", str(scripted_config), "--data-dir", str(tmp_path / "d"))
    assert vtuber(*common, "chat", "--user", "ann", "--once", "I live by the sea").returncode == 0
    exported = vtuber(*common, "export", "--platform", "console", "--user", "ann")
    assert exported.returncode == 0, exported.stderr
    assert "I live by the sea" in exported.stdout
    json.loads(exported.stdout)
    refused = vtuber(*common, "forget", "--platform", "console", "--user", "ann")
    assert refused.returncode == 1 and "not confirmed" in refused.stderr  # no terminal to ask
    forgotten = vtuber(*common, "forget", "--platform", "console", "--user", "ann", "--yes")
    assert forgotten.returncode == 0, forgotten.stderr
    assert forgotten.stdout.startswith("deleted console:ann:")
    gone = vtuber(*common, "export", "--platform", "console", "--user", "ann")
    assert gone.returncode == 1 and "nothing stored about console:ann" in gone.stderr


def test_wrong_model_paths_are_reported_together_before_any_model_loads(
        tmp_path: Path) -> None:
    config = tmp_path / "paths.yaml"
    config.write_text(f"models:\n  llm:\n    model_path: {tmp_path / 'no-llm'}\n"
                      f"  embedding:\n    model_path: {tmp_path / 'no-embedder'}\n",
                      encoding="utf-8")
    started = time.monotonic()
    result = vtuber("--config", str(config), "--data-dir", str(tmp_path / "d"), "chat",
                    "--once", "hi")
    assert time.monotonic() - started < 30  # no model was loaded first
    assert result.returncode == 78, result.stderr
    problems = [line for line in result.stderr.splitlines() if line.startswith("config error:")]
    assert len(problems) == 2, result.stderr
    assert "models.llm.model_path" in problems[0] and "no-llm" in problems[0]
    assert "models.embedding.model_path" in problems[1] and "no-embedder" in problems[1]
    diagnosis = vtuber("--config", str(config), "--data-dir", str(tmp_path / "d"),
                       "diagnose", "--json")
    assert diagnosis.returncode == 1  # issues: a deploy script can stop on them
    issues = json.loads(diagnosis.stdout)["issues"]
    assert any("no-llm" in issue for issue in issues)
    assert any("no-embedder" in issue for issue in issues)


def test_a_second_runtime_on_one_sqlite_store_is_refused(tmp_path: Path) -> None:
    """Different data dirs, one SQLite file: the second process is refused in one line that
    points to PostgreSQL (SQLite serialises writers within one process only)."""
    shared = tmp_path / "shared.db"
    config = tmp_path / "config.yaml"
    config.write_text(SCRIPTED + f"store:\n  url: sqlite+aiosqlite:///{shared}\n",
                      encoding="utf-8")
    with _chat_running(config, tmp_path / "one") as first:
        second = vtuber("--config", str(config), "--data-dir", str(tmp_path / "two"), "chat",
                        "--once", "hi")
    assert second.returncode == 75
    errors = [line for line in second.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, second.stderr
    assert f"(pid {first.pid})" in errors[0] and str(shared) in errors[0]
    assert "PostgreSQL" in errors[0]
