"""Shared fixtures. The outbound network is blocked for the whole session."""

from __future__ import annotations

import itertools
import os
import shutil
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import network_guard, openai_servers, secret_guard
from tests.cli_logging import root_logging_restored
from tests.fake_discord import TWO_SHARD_GUILDS, FakeDiscord
from tests.fake_openai import FakeOpenAI
from tests.fake_twitch import FakeTwitch
from tests.pg_server import PostgresServer, running_server

network_guard.install()
secret_guard.install()
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def no_secret_in_logs() -> Iterator[None]:
    """Fails the test during which a configured secret reached a log record or CLI output."""
    seen = len(secret_guard.leaks)
    yield
    new = secret_guard.leaks[seen:]
    if new:
        pytest.fail("secret leaked:\n" + "\n".join(sorted(set(new))), pytrace=False)


@pytest.fixture(autouse=True)
def root_logging_kept() -> Iterator[None]:
    """A test that runs ``bot.cli.main`` in-process configures the root logger with a handler
    on the test's captured stream; left there, every later record is a "Logging error"."""
    with root_logging_restored():
        yield


@pytest.fixture
def own_postgres() -> Iterator[Any]:
    """A PostgreSQL server of this test's own, so stopping or restarting it disturbs no
    other test (durable: it survives being killed)."""
    from tests.pg_server import running_server

    with running_server("vtuber-pg-own-", durable=True) as server:
        if server is None:
            pytest.skip("no PostgreSQL server binaries on this machine")
        yield server


@pytest.fixture(scope="session")
def model_cache() -> Iterator[Path]:
    """One converted copy of the bundled model for the whole session."""
    path = Path(tempfile.mkdtemp(prefix="vtuber-model-cache-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model_dir() -> Iterator[Path]:
    from tests.tiny_model import build_tiny_qwen3

    path = Path(tempfile.mkdtemp(prefix="vtuber-tiny-qwen3-"))
    yield build_tiny_qwen3(path)
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def vllm_server(model_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The real vLLM (CPU build) serving the bundled model; one for the whole session."""
    yield from openai_servers.vllm_server(model_cache, tmp_path_factory)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer | None]:
    with running_server("vtuber-pg-") as server:
        yield server


_db_names = itertools.count(1)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh, empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'test.db'}"
    server = request.getfixturevalue("postgres_server")
    if server is None:
        pytest.skip("no PostgreSQL server binaries on this machine (initdb not found)")
    return server.create_database(f"t{os.getpid()}_{next(_db_names)}")


@pytest.fixture
async def store(db_url: str) -> AsyncIterator[object]:
    from memory.store import Store

    opened = await Store.open(db_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
def python() -> str:
    return sys.executable


@pytest.fixture
async def fakes() -> AsyncIterator[tuple[FakeDiscord, FakeTwitch]]:
    """A fake Discord (two shards, a guild on each) and a fake Twitch, for bot processes."""
    discord, twitch = FakeDiscord(guilds=TWO_SHARD_GUILDS, shard_count=2), FakeTwitch()
    await discord.start()
    await twitch.start()
    try:
        yield discord, twitch
    finally:
        await discord.stop()
        await twitch.stop()


@pytest.fixture
async def model_server() -> AsyncIterator[FakeOpenAI]:
    """An OpenAI-compatible model server that answers at once (or holds what it is told)."""
    server = FakeOpenAI()
    await server.start()
    try:
        yield server
    finally:
        server.release()
        await server.stop()
