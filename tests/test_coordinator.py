"""Coordinator replicas against a real server: they rebuild from the log, race only on writes, and the
stream keeps exactly one decision per task attempt."""

from __future__ import annotations

import asyncio
from collections import Counter

import pytest

from dtf import events as ev
from dtf import subjects
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
