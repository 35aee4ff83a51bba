"""The operator's HTTP server: health and readiness, Prometheus metrics that match the store,
pause/resume and forget from the dashboard's API, the token, and the OBS overlay in a real
headless Chromium (Debian's chromium + chromium-driver)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import shutil
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.config import AppConfig, parse_config
from bot.events import ChatEvent
from bot.operator import RuntimeView, binding_problems, operator_server
from bot.paths import DataPaths
from bot.runtime import Runtime, open_runtime
from tests.sinks import RecordingSink

TOKEN = "web-token-test-7731"


def make_config(db_url: str, *, token: str | None = None, host: str = "127.0.0.1",
                replies: list[str] | None = None, chunk_delay_s: float = 0.0) -> AppConfig:
    return parse_config({
        "models": {"llm": {"backend": "scripted",
                           "scripted": {"replies": replies or ["好的 好的 收到 囉"],
                                        "chunk_delay_s": chunk_delay_s}},
                   "embedding": {"enabled": False}},
        "store": {"url": db_url, "remember_messages_min_chars": 0},
        "web": {"enabled": True, "host": host, "port": 0, "overlay": {"fade_after_s": 30}},
    }, env={"VTUBER_WEB_TOKEN": token} if token else {})


@dataclass
class FakeAdapter:
    """Only what the operator server asks of an adapter: its name and readiness."""

    name: str
    ready: bool = False

    def is_ready(self) -> bool:
        return self.ready


def chat(text: str, user: str = "ann", platform: str = "discord",
         sink: RecordingSink | None = None) -> ChatEvent:
    return ChatEvent(platform=platform, channel_id="c1", platform_user_id=user,
                     display_name=user.title(), text=text, sink=sink or RecordingSink())


@dataclass
class Served:
    runtime: Runtime
    adapter: FakeAdapter
    url: str
    client: httpx.AsyncClient


async def _serve(config: AppConfig, tmp_path: Path,
                 adapter: FakeAdapter | None = None) -> AsyncIterator[Served]:
    adapter = adapter or FakeAdapter("discord")
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime, \
            operator_server(config, RuntimeView(runtime, [adapter])) as url:
        assert url is not None
        async with httpx.AsyncClient(base_url=url, timeout=10) as client:
            # Control actions carry the CSRF token the dashboard page holds, as its own
            # buttons do.
            token = config.secrets.web_token
            auth = {"Authorization": f"Bearer {token.get_secret_value()}"} if token else {}
            page = (await client.get("/dashboard", headers=auth)).text
            found = re.search(r'"X-CSRF-Token": "([^"]+)"', page)
            assert found is not None
            client.headers["X-CSRF-Token"] = found.group(1)
            yield Served(runtime, adapter, url, client)


@pytest.fixture
async def served(db_url: str, tmp_path: Path) -> AsyncIterator[Served]:
    async for served in _serve(make_config(db_url), tmp_path):
        yield served


async def test_health_is_alive_and_ready_waits_for_the_adapter(served: Served) -> None:
    assert (await served.client.get("/healthz")).status_code == 200
    response = await served.client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["not_ready"] == ["adapter:discord"]
    served.adapter.ready = True  # the gateway sent READY
    response = await served.client.get("/readyz")
    assert response.status_code == 200 and response.json()["checks"] == {
        "adapter:discord": True, "store": True, "engine": True}
    assert (await served.client.get("/healthz")).status_code == 200


async def test_readiness_follows_the_discord_gateway(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The real discord.py client against the fake gateway, which withholds READY at first:
    /readyz is 503 naming the adapter (the socket is open, the session is not ready), then 200;
    /healthz is 200 throughout."""
    pytest.importorskip("discord")
    from adapters.discord_adapter.adapter import DiscordAdapter
    from tests.fake_discord import FakeDiscord, point_discord_at

    server = FakeDiscord()
    server.ready_allowed.clear()
    await server.start()
    point_discord_at(server, monkeypatch)
    config = parse_config({
        "models": {"llm": {"backend": "scripted"}, "embedding": {"enabled": False}},
        "store": {"url": f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}"},
        "adapters": {"discord": {"enabled": True}},
        "web": {"enabled": True, "port": 0}}, env={"DISCORD_TOKEN": "fake-token"})
    async with open_runtime(config, DataPaths.resolve(tmp_path)) as runtime:
        adapter = DiscordAdapter(config, services=runtime)
        running = asyncio.create_task(adapter.run(runtime.service.handle))
        try:
            async with operator_server(config, RuntimeView(runtime, [adapter])) as url, \
                    httpx.AsyncClient(base_url=str(url), timeout=10) as client:
                async with asyncio.timeout(20):
                    while server.identifies == 0:  # noqa: ASYNC110 - a server's counter
                        await asyncio.sleep(0.05)
                waiting = await client.get("/readyz")
                assert waiting.status_code == 503
                assert waiting.json()["not_ready"] == ["adapter:discord"]
                assert (await client.get("/healthz")).status_code == 200
                server.ready_allowed.set()
                await asyncio.wait_for(adapter.client.wait_until_ready(), 20)
                ready = await client.get("/readyz")
                assert ready.status_code == 200, ready.json()
        finally:
            await adapter.close()
            running.cancel()
            await asyncio.gather(running, return_exceptions=True)
            await server.stop()


def _samples(text: str, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {tuple(sorted(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples if sample.name == name}


async def test_metrics_parse_and_match_the_store(served: Served) -> None:
    service = served.runtime.service
    for index in range(3):
        assert (await service.handle(chat(f"你好 {index}", user=f"v{index}"))).status == "answered"
    assert (await service.handle(chat("   "))).status == "dropped"
    await service.flush()
    text = (await served.client.get("/metrics")).text
    counted = _samples(text, "vtuber_messages_total")
    async with served.runtime.store.database.read() as session:
        from sqlalchemy import text as sql

        stored = dict((await session.execute(sql(
            "SELECT status, COUNT(*) FROM messages WHERE role = 'user' GROUP BY status"))).all())
    assert counted == {
        (("platform", "discord"), ("reason", ""), ("status", "answered")): stored["answered"],
        (("platform", "discord"), ("reason", "empty"), ("status", "dropped")): stored["dropped"]}
    replies = _samples(text, "vtuber_reply_seconds_count")
    assert replies == {(("platform", "discord"),): 3.0}
    assert _samples(text, "vtuber_store_up") == {(): 1.0}
    assert _samples(text, "vtuber_adapter_ready") == {(("adapter", "discord"),): 0.0}


async def test_metrics_say_what_runs_and_how_the_process_and_engine_are(
        served: Served) -> None:
    """Build info (version, commit, backend, model), the process's own collectors, and the
    engine's numbers (requests queued and in flight, here from the scripted backend)."""
    await served.runtime.service.handle(chat("你好"))
    text = (await served.client.get("/metrics")).text
    [(labels, value)] = _samples(text, "vtuber_build_info").items()
    build = dict(labels)
    assert value == 1.0 and build["backend"] == "scripted" and build["version"]
    assert build["git_sha"] and build["model"]
    assert _samples(text, "process_resident_memory_bytes")
    assert _samples(text, "python_info")


def test_the_engines_numbers_are_counters_and_gauges() -> None:
    from bot.operator.metrics import Metrics

    numbers = {"decode_steps": 120.0, "decode_s": 1.5, "prefill_s": 0.5, "prompt_tokens": 900.0,
               "cached_tokens": 600.0, "queued": 2.0, "in_flight": 7.0, "max_batch_size": 32.0}
    metrics = Metrics(lambda: 0, lambda: True, dict, dict, lambda: numbers)
    text = metrics.render().decode()
    assert _samples(text, "vtuber_engine_decode_steps_total") == {(): 120.0}
    assert _samples(text, "vtuber_engine_cached_prompt_tokens_total") == {(): 600.0}
    assert _samples(text, "vtuber_engine_requests_in_flight") == {(): 7.0}


async def test_the_status_says_what_the_engine_is_doing(served: Served) -> None:
    status = (await served.client.get("/api/status")).json()
    assert "engine" in status and "gpu_memory" in status
    assert status["moods"] == list(served.runtime.engine.persona.moods.states)


async def test_metrics_after_a_replay_match_the_store(tmp_path: Path) -> None:
    """Two stored conversations (several viewers; a flood that is rate-limited) replayed
    through the real service, a restart in between included: every counter equals the
    store's count of messages in that final state."""
    from sqlalchemy import text as sql

    from bot.operator.metrics import Metrics
    from bot.replay import read_transcript, replay
    from memory.store import Store

    metrics = Metrics(lambda: 0, lambda: True, dict, dict)
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    replays = Path(__file__).parent / "replays"
    for name in ("05_several_users.jsonl", "06_restart_in_the_middle.jsonl",
                 "11_rate_limited_flood.jsonl"):
        await replay(read_transcript(replays / name), config, DataPaths.resolve(tmp_path),
                     observers=[metrics])
    counted: dict[tuple[str, str], float] = {}
    for labels, value in _samples(metrics.render().decode(), "vtuber_messages_total").items():
        by_name = dict(labels)
        key = (by_name["status"], by_name["reason"])
        counted[key] = counted.get(key, 0) + value
    store = await Store.open(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    try:
        async with store.database.read() as session:
            stored = {(status, reason or ""): count for status, reason, count in (
                await session.execute(sql(
                    "SELECT status, status_reason, COUNT(*) FROM messages "
                    "WHERE role = 'user' GROUP BY status, status_reason"))).all()}
    finally:
        await store.close()
    assert counted == stored and ("dropped", "rate_limited") in stored


async def test_the_error_feed_counts_a_repeated_problem_once_and_masks_secrets(
        tmp_path: Path) -> None:
    """The dashboard's feed: the same warning with other values is one line, counted; a
    secret a library quoted is masked as in the log; newest first."""
    import logging

    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", token=TOKEN)
    store_log = logging.getLogger("memory.store.test")
    async for served in _serve(config, tmp_path):
        for message_id in range(3):
            store_log.warning("message %d: store unavailable", message_id)
        logging.getLogger("tests.adapter").error("login refused for token %s", TOKEN)
        status = (await served.client.get(
            "/api/status", headers={"Authorization": f"Bearer {TOKEN}"})).json()
    newest, repeated = status["problems"][:2]
    assert newest["level"] == "ERROR" and TOKEN not in newest["message"]
    assert "***" in newest["message"]
    assert (repeated["count"], repeated["message"]) == (3, "message 2: store unavailable")


async def test_pause_drops_with_a_reason_and_resume_answers_again(served: Served) -> None:
    service = served.runtime.service
    response = await served.client.post("/api/control/pause/discord")
    assert response.json() == {"paused": ["discord"]}
    paused = await service.handle(chat("有人在嗎"))
    assert (paused.status, paused.reason) == ("dropped", "paused")
    assert (await served.client.post("/api/control/pause/nowhere")).status_code == 404
    await served.client.post("/api/control/resume/discord")
    assert (await service.handle(chat("有人在嗎"))).status == "answered"
    await service.flush()  # refused messages are recorded in batches; the page reads the store
    status = (await served.client.get("/api/status")).json()
    assert [m["status"] for m in status["recent"]] == ["answered", "dropped"]
    assert status["platforms"] == {"discord": {"ready": False, "paused": False}}


async def test_an_overlay_can_show_one_platform(served: Served) -> None:
    """`/overlay?platform=twitch`: a scene for one stream; the other platform's replies stay
    off it."""
    import json

    service = served.runtime.service
    async with served.client.stream("GET", "/overlay/events?platform=twitch") as events:
        lines = events.aiter_lines()
        assert await anext(lines) == ": connected"
        await service.handle(chat("來自 Discord", user="dee"))
        await service.handle(chat("來自 Twitch", user="tee", platform="twitch"))
        shown: list[dict[str, Any]] = []
        async with asyncio.timeout(10):
            async for line in lines:
                if line.startswith("data: "):
                    shown.append(json.loads(line.removeprefix("data: ")))
                    if shown[-1]["done"]:
                        break
    assert {event["name"] for event in shown} == {"Tee"}


async def test_a_store_failure_under_a_page_is_a_503_with_its_reason(
        served: Served, monkeypatch: pytest.MonkeyPatch) -> None:
    from memory.errors import StoreError

    async def unreachable(*_args: Any) -> None:
        raise StoreError("store: connection refused")

    monkeypatch.setattr(served.runtime.store, "find_user", unreachable)
    for response in (await served.client.get("/api/viewer/discord/ann"),
                     await served.client.post("/api/control/forget", json={
                         "platform": "discord", "platform_user_id": "ann"})):
        assert response.status_code == 503
        assert response.json() == {"error": "store: connection refused"}


async def test_controls_from_another_site_are_refused(served: Served) -> None:
    """A page of another site, open in the operator's browser, cannot drive the controls."""
    foreign = {"Origin": "https://evil.example"}
    response = await served.client.post("/api/control/pause/discord", headers=foreign)
    assert response.status_code == 403 and served.runtime.service.paused == set()
    own = {"Origin": served.url}
    assert (await served.client.post("/api/control/pause/discord", headers=own)).status_code == 200
    assert (await served.client.get("/api/status", headers=foreign)).status_code == 200


async def test_a_rebound_host_name_and_a_control_without_the_csrf_token_are_refused(
        served: Served) -> None:
    """DNS rebinding: a page of the attacker's site, its name now resolving to 127.0.0.1,
    reaches this server under that name; it is refused. A control action without the token
    the dashboard page holds is refused too."""
    rebound = {"Host": "attacker.example:8080"}
    for path in ("/api/status", "/dashboard", "/api/viewer/discord/ann"):
        assert (await served.client.get(path, headers=rebound)).status_code == 421, path
    forged = await served.client.post("/api/control/pause/discord",
                                      headers={"X-CSRF-Token": "guessed"})
    assert forged.status_code == 403 and served.runtime.service.paused == set()
    assert (await served.client.get("/api/status", headers={"Host": "localhost"})
            ).status_code == 200


async def test_forget_from_the_dashboard_removes_the_viewer(served: Served) -> None:
    from tests.test_memory import MARK, _rows_mentioning

    store = served.runtime.store
    await served.runtime.service.handle(chat(f"記得我 {MARK} 我喜歡喝茶", user="bea"))
    user_id = await store.find_user("discord", "bea")
    assert user_id is not None and await _rows_mentioning(store, user_id)
    response = await served.client.post("/api/control/forget", json={
        "platform": "discord", "platform_user_id": "bea"})
    assert response.status_code == 200 and response.json()["deleted"]
    assert await store.find_user("discord", "bea") is None
    assert await _rows_mentioning(store, user_id) == []  # every table, the FTS index too
    bad = await served.client.post("/api/control/forget", content=b"not json")
    assert bad.status_code == 400


async def test_a_viewer_page_has_stats_history_chart_export_and_traces(
        served: Served) -> None:
    service, client = served.runtime.service, served.client
    await service.handle(chat("謝謝你", user="cat"))
    second = await service.handle(chat("今天的星星好亮", user="cat"))
    viewer = (await client.get("/api/viewer/discord/cat")).json()
    assert viewer["stats"]["conversation_count"] == 2
    assert viewer["stats"]["current_mood"] == "excited"
    assert [m["role"] for m in viewer["messages"]] == ["user", "assistant"] * 2
    assert viewer["identities"] == [{"platform": "discord", "platform_user_id": "cat",
                                     "display_name": "Cat"}]
    chart = await client.get("/api/viewer/discord/cat/chart.png")
    assert chart.headers["content-type"] == "image/png" and chart.content[:4] == b"\x89PNG"
    export = await client.get("/api/viewer/discord/cat/export")
    assert "attachment" in export.headers["content-disposition"]
    assert len(export.json()["messages"]) == 4
    status = (await client.get("/api/status")).json()
    assert status["recent"][0]["reply_id"] == second.message_id
    trace = (await client.get(f"/api/trace/{second.message_id}")).json()
    assert trace["message_id"] == second.message_id and trace["content"] == second.text
    for missing in ("/api/viewer/discord/nobody", "/api/viewer/discord/nobody/chart.png",
                    "/api/trace/999999"):
        assert (await client.get(missing)).status_code == 404, missing
    assert (await client.get("/api/gpu")).json()["gpu_count"] >= 0
    assert "issues" in (await client.get("/api/diagnose")).json()


async def test_a_token_guards_everything_but_the_liveness_probe(
        db_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="httpx")  # the test client logs ?token= URLs
    async for served in _serve(make_config(db_url, token=TOKEN), tmp_path):
        client = served.client
        assert (await client.get("/healthz")).status_code == 200
        for path in ("/readyz", "/metrics", "/api/status", "/overlay", "/dashboard"):
            assert (await client.get(path)).status_code == 401, path
        assert (await client.post("/api/control/pause/discord")).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert (await client.get("/metrics", headers=wrong)).status_code == 401
        right = {"Authorization": f"Bearer {TOKEN}"}
        assert (await client.get("/metrics", headers=right)).status_code == 200
        assert (await client.get(f"/overlay?token={TOKEN}")).status_code == 200


def test_binding_beyond_loopback_needs_a_token(db_url: str) -> None:
    assert binding_problems(make_config(db_url)) == []
    assert binding_problems(make_config(db_url, host="::1")) == []
    assert binding_problems(make_config(db_url, host="0.0.0.0", token=TOKEN)) == []
    assert binding_problems(make_config(db_url, host="0.0.0.0"))[0].startswith("web.host:")


def test_run_refuses_a_public_binding_without_a_token(tmp_path: Path, python: str) -> None:
    config = tmp_path / "config.yaml"
    config.write_text("adapters: {console: {enabled: true}}\n"
                      "models: {llm: {backend: scripted}, embedding: {enabled: false}}\n"
                      "web: {enabled: true, host: 0.0.0.0}\n", encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if k != "VTUBER_WEB_TOKEN"}
    done = subprocess.run([python, "-m", "bot", "run", "--config", str(config),
                           "--data-dir", str(tmp_path / "data")], env=env, input="",
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 78, done.stderr
    assert "web.host: 0.0.0.0" in done.stderr and "VTUBER_WEB_TOKEN" in done.stderr


# -- a real browser ---------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
if os.environ.get("VTUBER_REQUIRE_BROWSER") and not (CHROMIUM and CHROMEDRIVER):
    raise RuntimeError("VTUBER_REQUIRE_BROWSER is set but chromium/chromedriver are missing")
browser = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (.ci/run installs them)")
ARTIFACTS = Path(os.environ.get("TEST_ARTIFACTS", "test-artifacts"))
# Records every text the subtitle shows, and the mood it carried, as the page changes.
RECORD = """
window.seen = [];
const box = document.getElementById('subtitle');
new MutationObserver(() => {
  const text = document.getElementById('text').textContent;
  const last = window.seen[window.seen.length - 1];
  if (!last || last.text !== text || last.mood !== box.dataset.mood) {
    window.seen.push({text, mood: box.dataset.mood, done: box.dataset.done});
  }
}).observe(box, {subtree: true, childList: true, characterData: true, attributes: true});
"""


def _chromium() -> Any:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM or ""
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync",
                 "--window-size=1280,720"):
        options.add_argument(flag)
    return webdriver.Chrome(options=options, service=Service(CHROMEDRIVER or ""))


async def _until(driver: Any, script: str, seconds: float = 15) -> Any:
    """Poll the page (it has no way to tell us) until ``script`` returns something true."""
    async with asyncio.timeout(seconds):
        while not (value := await asyncio.to_thread(  # noqa: ASYNC110 - a browser, not an event
                driver.execute_script, script)):
            await asyncio.sleep(0.05)
    return value


async def _screenshot(driver: Any, name: str) -> Path:
    path = ARTIFACTS / name
    await asyncio.to_thread(path.parent.mkdir, parents=True, exist_ok=True)
    await asyncio.to_thread(driver.save_screenshot, str(path))
    return path


@browser
async def test_the_overlay_streams_the_reply_and_shows_the_mood(tmp_path: Path) -> None:
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", chunk_delay_s=0.15,
                         replies=["一閃一閃亮晶晶。 滿天都是小星星。 "
                                  "掛在天上放光明。 好像許多小眼睛。"])
    driver = await asyncio.to_thread(_chromium)
    try:
        async for served in _serve(config, tmp_path):
            await asyncio.to_thread(driver.get, served.url + "/overlay")
            await _until(driver, "return document.getElementById('subtitle') !== null")
            await asyncio.to_thread(driver.execute_script, RECORD)
            await asyncio.sleep(0.5)  # the page's event stream is connected
            service = served.runtime.service
            first = await service.handle(chat("你好"))
            await _until(driver, "return document.getElementById('subtitle')"
                                 ".dataset.done === 'true'")
            seen = await asyncio.to_thread(driver.execute_script, "return window.seen")
            second = await service.handle(chat("今天的星星好亮"))
            await _until(driver, "const b = document.getElementById('subtitle');"
                                 "return b.dataset.done === 'true' && b.dataset.mood === "
                                 "'excited'")
            screenshot = await _screenshot(driver, "overlay.png")
            shown = await asyncio.to_thread(
                driver.execute_script, "return document.getElementById('text').textContent")
    finally:
        await asyncio.to_thread(driver.quit)
    texts = [entry["text"] for entry in seen if entry["text"]]
    assert len(set(texts)) >= 3, texts  # it grew while the reply was generated
    assert all(len(a) <= len(b) for a, b in itertools.pairwise(texts)), texts
    assert texts[-1] == first.text and seen[-1]["mood"] == "calm"
    assert shown == second.text
    assert screenshot.stat().st_size > 0


@browser
async def test_the_overlay_keeps_a_long_reply_on_screen_under_the_personas_name(
        tmp_path: Path) -> None:
    """A 600-character reply on a 1280x720 canvas: the box stays on screen with its label;
    the label is the persona's (the viewer is named with their question above it); the mood
    is the persona's own word for it, shown from the first words on."""
    long_reply = " ".join(f"第{n}座燈塔的光每十秒轉一圈，照亮海上的船。" for n in range(1, 28))
    assert len(long_reply) >= 600
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}", chunk_delay_s=0.05,
                         replies=[long_reply])
    driver = await asyncio.to_thread(_chromium)
    try:
        await asyncio.to_thread(driver.set_window_size, 1280, 720)
        async for served in _serve(config, tmp_path):
            await asyncio.to_thread(driver.get, served.url + "/overlay")
            await _until(driver, "return document.getElementById('subtitle') !== null")
            await asyncio.sleep(0.5)  # the page's event stream is connected
            answered = asyncio.create_task(served.runtime.service.handle(chat("燈塔在哪裡？")))
            first_mood = await _until(driver, "return document.getElementById('mood')"
                                              ".textContent")
            await _until(driver, "return document.getElementById('subtitle')"
                                 ".dataset.done === 'true'")
            await answered
            await asyncio.sleep(0.7)  # the box's fade-in has finished
            placed = await asyncio.to_thread(driver.execute_script, """
                const rect = id => document.getElementById(id).getBoundingClientRect();
                return {who: rect('who').top, box: rect('subtitle').top,
                        bottom: rect('subtitle').bottom, height: window.innerHeight,
                        text: rect('text').height,
                        label: document.getElementById('who').textContent,
                        asker: document.getElementById('asker').textContent,
                        asked: document.getElementById('asked').textContent};""")
            await _screenshot(driver, "overlay-long.png")
    finally:
        await asyncio.to_thread(driver.quit)
    assert first_mood == "♥ 平靜"
    assert placed["label"] == "燈芯佩兒"
    assert placed["asker"].startswith("Ann") and placed["asked"] == "燈塔在哪裡？"
    assert 0 <= placed["box"] <= placed["who"] and placed["bottom"] <= placed["height"]
    assert placed["text"] >= 3 * 32  # several lines of it are shown, the newest


@browser
async def test_the_overlay_preview_streams_samples_without_a_chat(tmp_path: Path) -> None:
    """/overlay/preview: sample replies stream in the same page, to set the source up in OBS
    before any viewer speaks."""
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    driver = await asyncio.to_thread(_chromium)
    try:
        async for served in _serve(config, tmp_path):
            await asyncio.to_thread(driver.get, served.url + "/overlay/preview")
            first = await _until(driver, "return document.getElementById('text').textContent")
            later = await _until(driver, "const t = document.getElementById('text')"
                                         f".textContent; return t.length > {len(first)} && t")
            label = await asyncio.to_thread(
                driver.execute_script, "return document.getElementById('who').textContent")
    finally:
        await asyncio.to_thread(driver.quit)
    assert later.startswith(first) and label


@browser
async def test_the_dashboard_shows_replies_from_before_a_restart(tmp_path: Path) -> None:
    """Recent messages come from the store: after a restart the last conversation is still
    there, with time, channel, viewer, question and reply."""
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    async for served in _serve(config, tmp_path):
        answered = await served.runtime.service.handle(chat("昨天的流星好美"))
        await served.runtime.service.settle()
    assert answered.status == "answered"
    driver = await asyncio.to_thread(_chromium)
    try:
        async for served in _serve(config, tmp_path):  # a new process, as far as it can tell
            await asyncio.to_thread(driver.get, served.url + "/dashboard")
            row = await _until(driver, "const r = document.querySelector('#recent tr');"
                                       "return r && [...r.cells].map(c => c.textContent)")
    finally:
        await asyncio.to_thread(driver.quit)
    time, platform, channel, viewer, question, reply, state = row[:7]
    assert time and (platform, channel, viewer) == ("discord", "c1", "Ann")
    assert (question, reply, state) == ("昨天的流星好美", answered.text, "answered")


@browser
async def test_the_dashboard_follows_the_chat_and_pauses_a_platform(tmp_path: Path) -> None:
    config = make_config(f"sqlite+aiosqlite:///{tmp_path / 'bot.db'}")
    recent = ("return [...document.querySelectorAll('#recent tr')]"
              ".map(r => r.cells[6].textContent)")
    driver = await asyncio.to_thread(_chromium)
    try:
        async for served in _serve(config, tmp_path):
            await asyncio.to_thread(driver.get, served.url + "/dashboard")
            service = served.runtime.service
            assert (await service.handle(chat("你好"))).status == "answered"
            await _until(driver, recent + ".includes('answered')")
            await _until(driver, "return document.querySelector("
                                 "'#platforms tr[data-platform=discord] button')")
            await asyncio.to_thread(driver.execute_script, "document.querySelector("
                                    "'#platforms tr[data-platform=discord] button').click()")
            await _until(driver, "return [...document.querySelectorAll('#platforms td')]"
                                 ".some(td => td.textContent === 'paused')")
            assert service.paused == {"discord"}
            assert (await service.handle(chat("在嗎"))).reason == "paused"
            states = await _until(driver, recent + ".includes('dropped (paused)') && "
                                  + recent.removeprefix("return "))
            # The viewer's page: stats, history and the chart, loaded by clicking their name.
            await asyncio.to_thread(driver.execute_script,
                                    "document.querySelector('#recent tr button').click()")
            chart_width = await _until(driver, "const c = document.getElementById("
                                       "'viewer-chart'); return c.complete && c.naturalWidth")
            history = await _until(driver, "return document.querySelectorAll("
                                   "'#viewer-history tr').length")
            await _screenshot(driver, "dashboard.png")
    finally:
        await asyncio.to_thread(driver.quit)
    assert states == ["dropped (paused)", "answered"]
    assert chart_width > 100 and history == 3  # 你好, its reply, 在嗎 (dropped)


if __name__ == "__main__":  # pragma: no cover - a manual look at the overlay
    sys.exit(pytest.main([__file__, "-k", "overlay", "-s"]))
