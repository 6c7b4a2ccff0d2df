"""Issue #13 item 3 end to end, against a real nats-server: a worker whose durable consumer was
overwritten keeps heartbeating but never receives its assignment. The coordinator takes the attempt
back at the start deadline, the task runs on another worker, and it has exactly one outcome."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta

from test_worker_agent import SAFETY_S, command, of, running_agent, stored, submit, wait_for

from dtf import events as ev
from dtf import schedule
from dtf.cli.coordinator import Coordinator
from dtf.state import Fold
from dtf.streams import bus, topology


@contextlib.asynccontextmanager
async def running_coordinator(nc, policy: schedule.Policy):
    stop = asyncio.Event()
    task = asyncio.create_task(Coordinator(nc, "c1", policy).run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, SAFETY_S)


async def test_an_assignment_a_live_worker_never_receives_is_taken_back_and_runs_elsewhere_once(
        nats_server, nc, js, tmp_path):
    policy = schedule.Policy(start_deadline=timedelta(seconds=1.5))
    async with running_coordinator(nc, policy), running_agent(nats_server, js, tmp_path / "a", worker_id="w-a"):
        # Someone overwrites w-a's durable consumer: it now waits on a subject nothing is sent to.
        broken = topology.worker_consumer("w-a")
        broken.filter_subject = "dtf.task.*.*.assigned.nobody"
        await js.add_consumer(topology.EVENTS, broken)
        await submit(js, "t1", command("echo ran-once"))
        _, first = await wait_for(js, of(ev.TaskAssigned, "t1"))
        assert (first.attempt, first.worker_id) == (1, "w-a")
        async with running_agent(nats_server, js, tmp_path / "b", worker_id="w-b", concurrency=2):
            _, result = await wait_for(js, lambda e: isinstance(e, ev.ResultReported) and e.task_id == "t1")
    assert (result.outcome, result.attempt, result.worker_id) == ("passed", 2, "w-b")
    events = [e for _, e in await stored(js, ["dtf.task.r1.t1.>"])]
    [taken_back] = [e for e in events if isinstance(e, ev.TaskFailed)]
    assert taken_back.id == "unstarted-t1-1" and taken_back.worker_id == "w-a"
    assert "not started within 1.5s" in taken_back.reason
    assert [(e.attempt, e.worker_id) for e in events if isinstance(e, ev.TaskStarted)] == [(2, "w-b")]
    assert len([e for e in events if isinstance(e, ev.ResultReported)]) == 1, "exactly one terminal outcome"
    fold = Fold()
    async for msg in bus.read(js, topology.EVENTS, ["dtf.>"]):
        fold.apply(msg.subject, msg.seq, msg.data)
    task = fold.tasks["t1"]
    assert (task.status, task.attempt, task.failures, task.lost) == ("passed", 2, 0, 1), "no retry used"
