"""Twitch across processes (issue "Scale-out II"): two `vtuber-bot run` processes on one
PostgreSQL share an EventSub conduit of two shards, one shard each, with the real twitchio
against a fake that speaks the conduit protocol (conduits, their shards' websocket sessions,
subscriptions with a conduit transport; each notification goes to one enabled shard). Every
message is answered exactly once, in each viewer's order; a process that takes overlapping
shards is refused; a process killed mid-chat loses nothing: its shard's events go to the
other, which adopts the questions it left."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path

import pytest

pytest.importorskip("twitchio")

from tests.fake_discord import FakeDiscord
from tests.fake_openai import FakeOpenAI
from tests.fake_twitch import FakeTwitch
from tests.test_scale_out_platforms import (
    VIEWERS,
    Fleet,
    Viewer,
    _config,
    _each_answered_once_in_order,
    _rows,
    _text,
    _wait_final,
    _wait_stored,
)

TWITCH_VIEWERS = [v for v in VIEWERS if v.platform == "twitch"]


async def _start_shards(fleet: Fleet, twitch: FakeTwitch) -> None:
    for shard in (0, 1):
        await fleet.start(f"twitch{shard}", "--adapters", "twitch",
                          "--twitch-shard-ids", str(shard), "--twitch-shard-count", "2")
    for shard in (0, 1):
        await fleet.wait_for_line(f"twitch{shard}", "subscribed to chat in")
    await twitch.wait_until(lambda: len(twitch.shards) == 2, seconds=60)


async def _chat(twitch: FakeTwitch, count: int, first: int = 0,
                shards: tuple[int | None, ...] = (0, 1)) -> list[Viewer]:
    """``count`` messages, each viewer writing again and again, sent to the shards in turn
    (None: no conduit)."""
    sent = []
    for index in range(first, first + count):
        viewer = TWITCH_VIEWERS[(index * 7) % len(TWITCH_VIEWERS)]
        await twitch.notify("channel.chat.message", twitch.chat_event(
            f"佩兒 {_text(index)}", user_id=viewer.platform_user_id,
            login=f"v{viewer.platform_user_id}"), shard=shards[index % len(shards)])
        sent.append(viewer)
    return sent


def _one_reply_each(twitch: FakeTwitch, count: int) -> None:
    parents = Counter(body.get("reply_parent_message_id") for body in twitch.sent_messages())
    assert len(parents) == count and set(parents.values()) == {1}


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_two_processes_on_one_conduit_each_answer_their_shards_chat_once(
        db_url: str, model_server: FakeOpenAI, fakes: tuple[FakeDiscord, FakeTwitch],
        tmp_path: Path) -> None:
    if not db_url.startswith("postgresql"):
        pytest.skip("several processes need PostgreSQL")
    discord, twitch = fakes
    fleet = Fleet(_config(tmp_path, db_url, model_server.base_url), tmp_path, discord, twitch)
    try:
        await _start_shards(fleet, twitch)
        await fleet.start("both", "--adapters", "twitch", "--twitch-shard-ids", "0,1",
                          "--twitch-shard-count", "2")
        refused = await fleet.processes["both"].wait()
        sent = await _chat(twitch, 60)
        await _wait_final(db_url, len(sent))
    finally:
        codes = await fleet.stop()
    assert refused == 75 and "overlaps twitch[" in fleet.log("both")
    assert codes == {"twitch0": 0, "twitch1": 0, "both": 75}
    assert len(twitch.conduits) == 1  # shard 0's process made it, shard 1's found it
    conduit_subscriptions = [s for s in twitch.subscriptions
                             if s["transport"]["method"] == "conduit"]
    assert conduit_subscriptions and len(conduit_subscriptions) == len(twitch.subscriptions)
    _each_answered_once_in_order(await _rows(db_url), sent)
    _one_reply_each(twitch, len(sent))
    for shard in (0, 1):  # each process answered the chat of its own shard
        assert "conduit shards " + str(shard) + " of 2" in fleet.log(f"twitch{shard}")


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_killed_shards_chat_goes_to_the_other_which_answers_what_it_left(
        db_url: str, model_server: FakeOpenAI, fakes: tuple[FakeDiscord, FakeTwitch],
        tmp_path: Path) -> None:
    """Shard 1's process is SIGKILLed with questions it took still unanswered, and stays
    down: Twitch sends the conduit's events to shard 0 only, and shard 0's process adopts
    the questions shard 1 left once its lease has run out (3 s here); every message is
    answered once, in each viewer's order."""
    if not db_url.startswith("postgresql"):
        pytest.skip("several processes need PostgreSQL")
    discord, twitch = fakes
    fleet = Fleet(_config(tmp_path, db_url, model_server.base_url, lease_s=3.0), tmp_path,
                  discord, twitch)
    held = {_text(i) for i in range(20) if i % 2 == 1}  # the ones sent to shard 1
    model_server.hold(lambda body: any(text in body["messages"][-1]["content"]
                                       for text in held))
    try:
        await _start_shards(fleet, twitch)
        sent = await _chat(twitch, 20)
        await _wait_stored(db_url, len(sent))
        await fleet.kill("twitch1")
        await twitch.wait_until(lambda: len(twitch.shards) == 1, seconds=60)
        model_server.release()
        sent += await _chat(twitch, 20, first=20, shards=(0,))
        await fleet.wait_for_line("twitch0", "a stopped process left waiting", within_s=60)
        await _wait_final(db_url, len(sent))
    finally:
        await fleet.stop()
    _each_answered_once_in_order(await _rows(db_url), sent)
    _one_reply_each(twitch, len(sent))


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_reply_posted_as_the_process_died_is_not_posted_again(
        db_url: str, model_server: FakeOpenAI, fakes: tuple[FakeDiscord, FakeTwitch],
        tmp_path: Path) -> None:
    """Twitch has no nonce: a reply Twitch posted while the process died before it heard
    back (SIGKILL with the request in flight) is not posted again by the restarted process;
    the question ends ``expired(crash_during_send)``. The next question is answered."""
    if not db_url.startswith("postgresql"):
        pytest.skip("several processes need PostgreSQL")
    discord, twitch = fakes
    fleet = Fleet(_config(tmp_path, db_url, model_server.base_url), tmp_path, discord, twitch)
    twitch.hold_chat = asyncio.Event()
    try:
        await fleet.start("twitch", "--adapters", "twitch")
        await fleet.wait_for_line("twitch", "subscribed to chat in")
        sent = await _chat(twitch, 1, shards=(None,))
        await twitch.wait_until(lambda: len(twitch.sent_messages()) == 1, seconds=60)
        await fleet.kill("twitch")  # Twitch posted it; the process never heard back
        twitch.hold_chat.set()
        await fleet.start("twitch", "--adapters", "twitch")
        await fleet.wait_for_line("twitch", "not sent again", within_s=60)
        await fleet.wait_for_line("twitch", "subscribed to chat in", times=2)
        sent += await _chat(twitch, 1, first=1, shards=(None,))
        await _wait_final(db_url, len(sent))
    finally:
        await fleet.stop()
    rows = await _rows(db_url)
    questions = sorted((q for qs, _ in rows.values() for q in qs), key=lambda q: q.id)
    assert [(q.status, q.status_reason) for q in questions] == [
        ("expired", "crash_during_send"), ("answered", None)]
    assert sum(len(replies) for _, replies in rows.values()) == 1
    _one_reply_each(twitch, 2)
