"""Coordinator replicas against a real server: they rebuild from the log, race only on writes, and the
stream keeps exactly one decision per task attempt."""

from __future__ import annotations

import asyncio
from collections import Counter
from datetime import timedelta

import pytest

from dtf import events as ev
from dtf import schedule, subjects
from dtf.cli.coordinator import Coordinator
from dtf.spec import TaskSpec
from dtf.streams import bus, topology


def submission(i: int, run_id: str = "r1") -> ev.TaskSubmitted:
    return ev.TaskSubmitted(
        id=f"submit-{i}", run_id=run_id, task_id=f"t{i}", submitter="alice",
        spec=TaskSpec(type="command", config={"command": "true"}),
    )


def worker(worker_id: str, concurrency: int) -> ev.WorkerRegistered:
    return ev.WorkerRegistered(worker_id=worker_id, host="h", pid=1, concurrency=concurrency)


async def heartbeats(worker_id: str, js) -> None:
    while True:
        await bus.publish(js, ev.WorkerHeartbeat(worker_id=worker_id))
        await asyncio.sleep(0.1)


async def stored_events(js) -> list[tuple[str, ev.Event | None]]:
    out = []
    async for msg in bus.read(js, topology.EVENTS, [subjects.TASKS, subjects.WORKERS]):
        try:
            out.append((msg.subject, ev.decode(msg.data)))
        except ev.DecodeError:
            out.append((msg.subject, None))
    return out


async def run_replicas(nc, count: int, until) -> list[Coordinator]:
    stop = asyncio.Event()
    replicas = [Coordinator(nc, f"c{i}") for i in range(count)]
    runs = [asyncio.create_task(r.run(stop)) for r in replicas]
    try:
        for _ in range(400):
            if await until():
                break
            await asyncio.sleep(0.05)
        else:
            pytest.fail("the coordinators never reached the expected state")
    finally:
        stop.set()
        await asyncio.gather(*runs)
    return replicas


async def test_two_replicas_assign_each_task_exactly_once(nc, js):
    await bus.publish(js, worker("w1", 30))
    await bus.publish(js, worker("w2", 30))
    await bus.publish_many(js, [submission(i) for i in range(40)])

    async def all_assigned() -> bool:
        events = await stored_events(js)
        return sum(isinstance(e, ev.TaskAssigned) for _, e in events) >= 40

    replicas = await run_replicas(nc, 2, all_assigned)
    assignments = [e for _, e in await stored_events(js) if isinstance(e, ev.TaskAssigned)]
    per_task = Counter(a.task_id for a in assignments)
    assert set(per_task) == {f"t{i}" for i in range(40)} and set(per_task.values()) == {1}
    assert all(a.attempt == 1 for a in assignments)
    assert Counter(a.worker_id for a in assignments) == {"w1": 20, "w2": 20}
    assert sum(r.published for r in replicas) == 40


async def test_a_replica_started_later_rebuilds_state_and_assigns_nothing_twice(nc, js):
    await bus.publish(js, worker("w1", 5))
    await bus.publish_many(js, [submission(i) for i in range(3)])

    async def three_assigned() -> bool:
        return sum(isinstance(e, ev.TaskAssigned) for _, e in await stored_events(js)) == 3

    await run_replicas(nc, 1, three_assigned)
    [late] = await run_replicas(nc, 1, lambda: asyncio.sleep(0.5, result=True))
    assert late.published == 0
    assert all(late.fold.tasks[f"t{i}"].status == "assigned" for i in range(3))


async def test_garbage_submissions_are_rejected_once_on_the_record_and_work_goes_on(nc, js):
    await nc.publish("dtf.task.r1.bad.submitted.mallory", b"\x00\xffnot json")
    await nc.publish("dtf.task.r1.t9.submitted.mallory", ev.encode(submission(9)))  # subject says mallory
    await nc.publish("dtf.task.oops", b"{}")
    await nc.flush()
    await bus.publish(js, worker("w1", 2))
    await bus.publish(js, submission(1))

    async def settled() -> bool:
        events = [e for _, e in await stored_events(js)]
        return sum(isinstance(e, ev.TaskRejected) for e in events) == 3 and any(
            isinstance(e, ev.TaskAssigned) for e in events)

    await run_replicas(nc, 2, settled)
    events = await stored_events(js)
    rejected = [e for _, e in events if isinstance(e, ev.TaskRejected)]
    assert sorted(r.source_subject for r in rejected) == [
        "dtf.task.oops", "dtf.task.r1.bad.submitted.mallory", "dtf.task.r1.t9.submitted.mallory"]
    assert len({r.source_seq for r in rejected}) == 3
    forged = next(r for r in rejected if r.task_id == "t9")
    assert "belongs on dtf.task.r1.t9.submitted.alice" in forged.reason
    assert [e.task_id for _, e in events if isinstance(e, ev.TaskAssigned)] == ["t1"]


async def test_a_worker_gets_no_more_work_than_its_concurrency(nc, js):
    await bus.publish(js, worker("w1", 2))
    await bus.publish_many(js, [submission(i) for i in range(5)])

    async def two_assigned() -> bool:
        return sum(isinstance(e, ev.TaskAssigned) for _, e in await stored_events(js)) >= 2

    [replica] = await run_replicas(nc, 1, two_assigned)
    await asyncio.sleep(0)  # let nothing else slip in
    assignments = [e for _, e in await stored_events(js) if isinstance(e, ev.TaskAssigned)]
    assert len(assignments) == 2
    assert replica.fold.active["w1"] == {a.task_id for a in assignments}


async def one_task_on_one_worker(nc, js, heartbeat_timeout_s: float):
    """Worker w1, task t1, and one replica with a short heartbeat timeout, running."""
    await bus.publish(js, worker("w1", 1))
    await bus.publish(js, submission(1))
    stop = asyncio.Event()
    replica = Coordinator(nc, "c1", schedule.Policy(heartbeat_timeout=timedelta(seconds=heartbeat_timeout_s)))
    return replica, stop, asyncio.create_task(replica.run(stop))


async def test_a_silent_worker_is_declared_lost_and_its_attempt_moves_to_a_live_worker(nc, js):
    replica, stop, running = await one_task_on_one_worker(nc, js, heartbeat_timeout_s=0.5)

    beats = asyncio.create_task(heartbeats("w1", js))
    try:
        while replica.fold.tasks.get("t1") is None or replica.fold.tasks["t1"].worker_id != "w1":
            await asyncio.sleep(0.05)
        await bus.publish(js, worker("w2", 1))
        beats.cancel()  # w1 falls silent, as if SIGKILLed
        beats = asyncio.create_task(heartbeats("w2", js))
        while replica.fold.tasks["t1"].worker_id != "w2":
            await asyncio.sleep(0.05)
    finally:
        beats.cancel()
        stop.set()
        await running
    events = [e for _, e in await stored_events(js)]
    kinds = [type(e).__name__ for e in events if not isinstance(e, ev.WorkerRegistered)]
    assert kinds == ["TaskSubmitted", "TaskAssigned", "WorkerLost", "TaskFailed", "TaskAssigned"]
    failed = next(e for e in events if isinstance(e, ev.TaskFailed))
    assert (failed.attempt, failed.worker_id, failed.category) == (1, "w1", "worker")
    second = [e for e in events if isinstance(e, ev.TaskAssigned)][-1]
    assert (second.attempt, second.worker_id) == (2, "w2")
    assert replica.fold.workers["w1"].status == "lost" and replica.fold.tasks["t1"].lost == 1


async def test_a_lost_worker_that_heartbeats_again_is_back_but_its_late_result_settles_nothing(nc, js):
    replica, stop, running = await one_task_on_one_worker(nc, js, heartbeat_timeout_s=0.3)
    beats = None
    try:
        while not any(isinstance(e, ev.TaskFailed) for _, e in await stored_events(js)):
            await asyncio.sleep(0.05)
        late = ev.ResultReported(run_id="r1", task_id="t1", attempt=1, worker_id="w1", outcome="passed")
        await bus.publish(js, late)
        beats = asyncio.create_task(heartbeats("w1", js))  # it was only paused: it beats again
        while replica.fold.tasks["t1"].attempt < 2:
            await asyncio.sleep(0.05)
    finally:
        if beats is not None:
            beats.cancel()
        stop.set()
        await running
    task = replica.fold.tasks["t1"]
    assert task.status == "assigned" and task.attempt == 2 and task.worker_id == "w1"
    assert task.counts.passed == 0  # the late result of attempt 1 was not taken
