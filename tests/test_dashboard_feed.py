"""The dashboard's feed against a real nats-server: it folds the whole history when it starts late,
then follows new events and heartbeats as they come; a drill-down reads a task's log from the
artifacts store; with no projector a question gets a clear "nothing answers"; and it works with only
the read-only viewer's permissions, as `dtf up` runs it."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime

import pytest

from dtf import events as ev
from dtf import subjects
from dtf.spec import TaskSpec
from dtf.streams import buckets, bus, topology
from dtf.ui.feed import Feed

SPEC = TaskSpec(type="command", config={"command": "make check"})


def history(task: str = "t1") -> list[ev.Event]:
    ids = {"run_id": "r1", "task_id": task}
    return [
        ev.WorkerRegistered(worker_id="w1", host="box", pid=1),
        ev.TaskSubmitted(**ids, submitter="ann", spec=SPEC),
        ev.TaskAssigned(**ids, attempt=1, worker_id="w1", coordinator="c", spec=SPEC),
        ev.TaskStarted(**ids, attempt=1, worker_id="w1"),
    ]


def finished(task: str = "t1", **fields) -> ev.ResultReported:
    return ev.ResultReported(run_id="r1", task_id=task, attempt=1, worker_id="w1", outcome="passed", **fields)


@contextlib.asynccontextmanager
async def following(nc):
    feed, stop = Feed(nc), asyncio.Event()
    running = asyncio.create_task(feed.run(stop))
    try:
        yield feed
    finally:
        stop.set()
        await running


async def until(condition) -> None:
    """Wait for something the feed will see (the test's timeout bounds it; no speed is asserted)."""
    while not condition():
        await asyncio.sleep(0.05)


async def test_a_feed_started_late_shows_the_whole_history_then_follows_new_events(nc, js):
    for event in history():
        await bus.publish(js, event)
    async with following(nc) as feed:
        await feed.caught_up.wait()
        assert feed.board.fold.tasks["t1"].status == "running"
        assert feed.board.fold.workers["w1"].status == "online"

        await bus.publish(js, finished(metrics={"seconds": 2.0}))
        await bus.publish(js, ev.WorkerHeartbeat(worker_id="w1", time=datetime(2030, 1, 1, tzinfo=UTC)))
        await until(lambda: feed.board.fold.tasks["t1"].status == "passed")
        await until(lambda: feed.board.fold.workers["w1"].last_heartbeat is not None)
        assert [p.value for p in feed.board.series["seconds"]] == [2.0]
        assert list(feed.heartbeats) == ["dtf.hb.w1"]


async def test_an_empty_log_counts_as_caught_up(nc, js):
    async with following(nc) as feed:
        await feed.caught_up.wait()
        assert feed.board.fold.tasks == {}


async def test_drill_down_reads_the_full_log_from_the_artifacts_store_else_the_tail(nc, js):
    await buckets.create(js, topology.artifacts_bucket("w1"))
    store = await js.object_store(topology.artifacts_bucket("w1"))
    await store.put("logs/t1/1", b"the whole log\n" * 3)
    for event in [*history("t1"), finished("t1", log_ref="logs/t1/1", output_tail="log\n"),
                  *history("t2")[1:], finished("t2", output_tail="only the tail\n")]:
        await bus.publish(js, event)
    async with following(nc) as feed:
        await feed.caught_up.wait()
        assert await feed.output_of("t1") == "the whole log\n" * 3
        assert await feed.output_of("t2") == "only the tail\n"
        assert await feed.output_of("nobody") == ""


async def test_with_no_projector_a_question_says_that_nothing_answers(nc, js):
    async with following(nc) as feed:
        with pytest.raises(LookupError, match="nothing answers dtf.query.results"):
            await feed.tests_of("t1")


async def test_the_read_only_viewer_role_is_enough_for_the_feed(secured_server):
    admin = await secured_server.connect(secured_server.admin)
    try:
        js = admin.jetstream()
        await topology.provision(js)
        for event in history():
            await bus.publish(js, event)
    finally:
        await admin.close()
    viewer = await secured_server.connect(secured_server.creds("viewer", "vic"))
    try:
        async with following(viewer) as feed:
            await feed.caught_up.wait()
            assert feed.board.fold.tasks["t1"].status == "running"
    finally:
        await viewer.close()


async def test_tabs_asking_for_one_forecast_at_once_share_one_computation(nc, js):
    calls = []

    def forecaster(points):
        calls.append(len(points))
        if len(points) < 2:
            raise ValueError("1 runs; a forecast needs at least 2")
        return {"runs": len(points)}

    for event in [*history(), finished(metrics={"seconds": 2.0})]:
        await bus.publish(js, event)
    feed, stop = Feed(nc, forecaster=forecaster), asyncio.Event()
    running = asyncio.create_task(feed.run(stop))
    try:
        await until(lambda: "seconds" in feed.board.series)
        answers = await asyncio.gather(*(feed.forecast("seconds") for _ in range(5)))
        assert answers == ["no forecast: 1 runs; a forecast needs at least 2"] * 5 and calls == [1]
        assert await feed.forecast("no such series") == "no forecast here"
    finally:
        stop.set()
        await running


async def test_a_replay_reads_the_stored_log_up_to_the_sequence_asked_or_one_tasks_events(nc, js):
    for event in [*history("t1"), *history("t2")[1:]]:
        await bus.publish(js, event)
    feed = Feed(nc)
    assert [m.seq for m in await feed.history(upto_seq=3)] == [1, 2, 3]
    assert [m.seq for m in await feed.history([subjects.task_any_run("t2")])] == [5, 6, 7]
