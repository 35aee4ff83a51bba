"""The bot's own overload control (``bot.flow.OverheadLimit`` over a ``Pipeline``): a chat
the bot keeps up with never meets it, a flood is held to what the store and the event loop
keep up with, a stall refuses at once, and calm restores it."""

from __future__ import annotations

import time

from bot.flow import CALM_S, STALL_QUEUE, OverheadLimit, Pipeline

BUDGET_S = 0.003


def test_a_chat_within_the_budget_never_meets_the_bound() -> None:
    limit, pipeline = OverheadLimit(BUDGET_S, ceiling=64), Pipeline()
    for _ in range(500):
        limit.record(0.001, time.monotonic())
    stays = [pipeline.enter() for _ in range(63)]  # a raid's burst, all at once
    assert limit.admits(pipeline, time.monotonic())
    assert limit.bound == 64
    for stay in stays:
        stay.leave()


def test_replies_over_the_budget_shrink_the_bound_to_one_not_below() -> None:
    limit, pipeline = OverheadLimit(BUDGET_S, ceiling=64), Pipeline()
    limit.record(0.001, time.monotonic())  # the floor: the bot can do 1 ms
    for _ in range(200):
        limit.record(0.020, time.monotonic())
    assert limit.bound == 1
    assert limit.admits(pipeline, time.monotonic())  # an empty pipeline always takes one
    stay = pipeline.enter()
    assert not limit.admits(pipeline, time.monotonic())
    stay.leave()


def test_a_stalled_queue_refuses_new_ones_at_once() -> None:
    limit, pipeline = OverheadLimit(BUDGET_S, ceiling=64), Pipeline()
    stays = [pipeline.enter() for _ in range(STALL_QUEUE)]
    now = time.monotonic()
    assert limit.admits(pipeline, now)
    assert not limit.admits(pipeline, now + 0.5)  # all still there half a second later
    with stays[0].away():  # waiting for the model is not the bot's stall
        assert limit.admits(pipeline, now + 0.5)  # fewer stuck than a queue: no stall
    for stay in stays:
        stay.leave()


def test_each_calm_second_doubles_the_bound_back() -> None:
    limit, pipeline = OverheadLimit(BUDGET_S, ceiling=64), Pipeline()
    limit.record(0.001, time.monotonic())
    for _ in range(200):
        limit.record(0.020, time.monotonic())
    later = time.monotonic()
    for _ in range(6):
        later += CALM_S
        limit.admits(pipeline, later)
    assert limit.bound == 64


def test_a_database_slow_even_when_idle_is_not_congestion() -> None:
    """A remote PostgreSQL: every message takes ~20 ms, quiet or not. Twice the lowest
    overhead seen is the budget then, and the bound stays open."""
    limit = OverheadLimit(BUDGET_S, ceiling=64)
    for index in range(500):
        limit.record(0.020 + 0.005 * (index % 3), time.monotonic())
    assert limit.bound == 64


def test_a_stay_counts_only_the_time_in_the_pipeline() -> None:
    pipeline = Pipeline()
    stay = pipeline.enter()
    with stay.away():
        time.sleep(0.05)
    assert len(pipeline) == 1
    stay.leave()
    assert len(pipeline) == 0 and stay.spent_s < 0.04


def test_a_budget_of_zero_turns_it_off() -> None:
    limit, pipeline = OverheadLimit(0, ceiling=4), Pipeline()
    stays = [pipeline.enter() for _ in range(10)]
    limit.record(5.0, time.monotonic())
    assert limit.admits(pipeline, time.monotonic() + 60)
    for stay in stays:
        stay.leave()
