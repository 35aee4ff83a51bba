"""Stored conversations replayed through the full service (scripted backend)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bot.config import AppConfig, parse_config
from bot.paths import DataPaths
from bot.replay import TranscriptError, read_transcript, replay
from memory.store import Store
from tests.store_reads import messages_for

REPLAYS = sorted((Path(__file__).parent / "replays").glob("*.jsonl"))
CONFIG = """
models:
  llm:
    backend: scripted
  embedding:
    enabled: false
"""


def scripted_config() -> AppConfig:
    import yaml

    return parse_config(yaml.safe_load(CONFIG), env={})


def test_there_are_enough_transcripts() -> None:
    assert len(REPLAYS) >= 10


@pytest.mark.parametrize("path", REPLAYS, ids=[p.stem for p in REPLAYS])
async def test_transcript_replays_with_expected_trajectory(path: Path, tmp_path: Path) -> None:
    events = read_transcript(path)
    report = await replay(events, scripted_config(), DataPaths.resolve(tmp_path))
    assert report.ok, "\n".join(report.mismatches)
    assert report.checks >= 1
    messages = [e for e in events if e["type"] == "message"]
    assert len(report.messages) == len(messages)
    # Persisted history: every inbound message stored, answered ones with a reply.
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'vtuber.db'}")
    try:
        for platform, user in {(e["platform"], e["user"]) for e in messages}:
            user_id = await store.find_user(platform, user)
            assert user_id is not None
            rows = await messages_for(store, user_id)
            inbound = [r for r in rows if r.role == "user"]
            sent = [e for e in messages if (e["platform"], e["user"]) == (platform, user)]
            assert [r.content for r in inbound] == [e["text"] for e in sent]
            answered = [r for r in inbound if r.status == "answered"]
            replies = [r for r in rows if r.role == "assistant"]
            assert len(replies) == len(answered)
            stats = report.final_stats[f"{platform}:{user}"]
            assert stats["conversation_count"] == len(answered)
    finally:
        await store.close()


async def test_simplified_input_is_answered_in_traditional(tmp_path: Path) -> None:
    events = read_transcript(next(p for p in REPLAYS if "zh_cn" in p.stem))
    report = await replay(events, scripted_config(), DataPaths.resolve(tmp_path))
    assert report.messages[-1].new == "收到：討厭下雨"


async def test_export_then_replay_reproduces_state(tmp_path: Path) -> None:
    from bot.replay import export_transcript

    source = tmp_path / "source"
    original = read_transcript(next(p for p in REPLAYS if "several_users" in p.stem))
    first = await replay(original, scripted_config(), DataPaths.resolve(source))
    store = await Store.open(f"sqlite+aiosqlite:///{source / 'vtuber.db'}")
    try:
        lines = await export_transcript(store, "pell", "calm")
    finally:
        await store.close()
    assert any(line["type"] == "expect" for line in lines)
    assert all(line.get("reply") for line in lines if line["type"] == "message")
    exported = tmp_path / "exported.jsonl"
    exported.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in lines),
                        encoding="utf-8")
    second = await replay(read_transcript(exported), scripted_config(),
                          DataPaths.resolve(tmp_path / "copy"))
    assert second.ok, second.mismatches
    assert second.final_stats == {
        key: {**value, "user_id": second.final_stats[key]["user_id"],
              "last_interaction_at": second.final_stats[key]["last_interaction_at"]}
        for key, value in first.final_stats.items()
    }


def test_bad_transcript_line_is_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"type": "message", "platform": "x", "user": "u", "text": "hi", '
                    '"at": "yesterday"}\n', encoding="utf-8")
    with pytest.raises(TranscriptError, match=r"bad\.jsonl:1: 'at' is not an ISO-8601"):
        read_transcript(path)


def test_cli_replay_export_and_trace(tmp_path: Path) -> None:
    config = tmp_path / "scripted.yaml"
    config.write_text(CONFIG, encoding="utf-8")
    data = tmp_path / "data"
    base = [sys.executable, "-m", "bot", "--config", str(config), "--log-level", "ERROR"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*base, *args], capture_output=True, text=True, timeout=120,
                              check=False)

    transcript = next(p for p in REPLAYS if "restart" in p.stem)
    result = run("replay", str(transcript), "--db-dir", str(data))
    assert result.returncode == 0, result.stderr
    assert "original: 嗨嗨" not in result.stdout  # that line belongs to another transcript
    assert "4 messages, 5 expectations checked, 0 mismatched" in result.stdout
    progress = [line for line in result.stderr.splitlines() if line.startswith("replay: ")]
    assert [line.split()[1] for line in progress] == ["1/4", "2/4", "3/4", "4/4"]
    exported = run("--data-dir", str(data), "export-transcript", "--user", "ann")
    assert exported.returncode == 0 and exported.stdout.count('"type": "message"') == 4
    replayed = run("--data-dir", str(data), "replay", "--from-db", "--json")
    assert replayed.returncode == 0, replayed.stderr
    assert json.loads(replayed.stdout)["ok"] is True
    trace = run("--data-dir", str(data), "trace", "1")
    assert trace.returncode == 0, trace.stderr
    assert {"backend", "sampling", "prompt_tokens", "timings_ms", "retrieved"} <= set(
        json.loads(trace.stdout)["trace"])
    broken = tmp_path / "wrong.jsonl"
    broken.write_text('{"type": "message", "platform": "discord", "user": "ann", "text": '
                      '"hi", "at": "2026-01-01T00:00:00+00:00", '
                      '"expect": {"conversation_count": 99}}\n', encoding="utf-8")
    mismatch = run("replay", str(broken))
    assert mismatch.returncode == 1
    assert "MISMATCH" in mismatch.stdout and "conversation_count 1 != 99" in mismatch.stdout
