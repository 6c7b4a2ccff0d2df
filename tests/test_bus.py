"""The bus contract against a real server: dedup by event id, the coordinator's write arbitration,
and stream reads that stop at the end or follow through a server restart."""

import asyncio
import contextlib

from dtf import events as ev
from dtf.spec import TaskSpec
from dtf.streams import bus, topology

import pytest


def submitted(task_id="t1", run_id="r1"):
    return ev.TaskSubmitted(
        id=f"submit-{task_id}", run_id=run_id, task_id=task_id, submitter="alice",
        spec=TaskSpec(type="command", config={"command": "true"}),
    )


def assigned(worker_id, task_id="t1", run_id="r1"):
    return ev.TaskAssigned(
        id=f"assign-{task_id}-1-{worker_id}", run_id=run_id, task_id=task_id, attempt=1,
        worker_id=worker_id, coordinator="c", spec=submitted().spec,
    )


async def test_a_republished_event_is_stored_once(js):
    first = await bus.publish(js, submitted())
    again = await bus.publish(js, submitted())
    assert again.duplicate and again.seq == first.seq


async def test_a_second_assignment_made_on_stale_state_is_refused_by_the_server(js):
    ack = await bus.publish(js, submitted())
    await bus.publish(js, assigned("w1"), expected_seq=ack.seq)
    with pytest.raises(bus.Conflict):
        await bus.publish(js, assigned("w2"), expected_seq=ack.seq)
    stored = [m async for m in bus.read(js, topology.EVENTS, ["dtf.task.>"])]
    assert [m.subject for m in stored] == ["dtf.task.r1.t1.submitted.alice", "dtf.task.r1.t1.assigned.w1"]


async def test_reading_an_empty_stream_ends_at_once(js):
    assert [m async for m in bus.read(js, topology.EVENTS, ["dtf.task.>"])] == []


async def test_pipelined_publishes_all_land_in_order(js):
    events = [submitted(f"t{i}") for i in range(300)]
    acks = await bus.publish_many(js, events, window=64)
    assert [a.seq for a in acks] == list(range(1, 301))
    stored = [m async for m in bus.read(js, topology.EVENTS, ["dtf.task.>"], start_seq=101)]
    assert [m.seq for m in stored] == list(range(101, 301))


async def test_a_follow_goes_on_after_the_server_restarts_with_every_message_once_and_in_order(nats_server, nc, js):
    def registered(i):
        return ev.WorkerRegistered(id=f"reg-{i}", worker_id=f"w{i}", host="h", pid=i)

    await bus.publish_many(js, [registered(i) for i in range(5)])
    reader = bus.read(js, topology.EVENTS, ["dtf.worker.>"], follow=True)
    async with contextlib.aclosing(reader) as messages:
        seen = [(await anext(messages)).seq for _ in range(5)]
        nats_server.stop()  # the ordered consumer (R1, in memory) is gone with it
        nats_server.start()
        while True:  # the client reconnects; JetStream answers again a little later
            try:
                await bus.publish(js, registered(5))
                break
            except Exception:  # noqa: BLE001 - any error here means "not yet"
                await asyncio.sleep(0.1)
        await bus.publish_many(js, [registered(i) for i in range(6, 10)])
        seen += [(await asyncio.wait_for(anext(messages), 60)).seq for _ in range(5)]
    assert seen == list(range(1, 11))
