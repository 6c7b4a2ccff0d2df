"""A worker's TaskStarted is a conditional write, like the coordinator's decisions: stored only if
nothing landed on the task since the worker found its assignment current. So when the coordinator
takes an attempt back for not starting in time just as the worker starts it, exactly one of the two
is stored, and a worker that lost the race skips the attempt instead of running it beside its
successor. Against a real nats-server."""

from __future__ import annotations

import sys

import pytest

from test_worker_agent import command, stored, submit_and_assign

from dtf import events as ev
from dtf.streams import bus
from dtf.workers.attempt import Attempt, Context, claim, still_current


def attempt_for(nc, js, tmp_path, seq: int) -> tuple[Context, Attempt]:
    ctx = Context(nc=nc, js=js, worker_id="w1", cache_dir=tmp_path / "cache", workdir=tmp_path, python=sys.executable)
    assignment = ev.TaskAssigned(id="assign-t1-1", run_id="r1", task_id="t1", attempt=1, worker_id="w1",
                                 coordinator="c", spec=command("true"), submitter="alice")
    return ctx, Attempt(assignment=assignment, msg=None, seq=seq)  # type: ignore[arg-type]


def taken_back() -> ev.TaskFailed:
    return ev.TaskFailed(id="unstarted-t1-1", run_id="r1", task_id="t1", attempt=1, worker_id="w1",
                         category="worker", reason="attempt 1 not started within 60s of assignment")


async def started_events(js) -> list[ev.Event]:
    return [e for _, e in await stored(js, ["dtf.task.r1.t1.>"]) if isinstance(e, ev.TaskStarted)]


async def test_a_current_assignment_is_started_once(nc, js, tmp_path):
    seq = await submit_and_assign(js, "t1", command("true"))
    ctx, attempt = attempt_for(nc, js, tmp_path, seq)
    assert await claim(ctx, attempt, await still_current(ctx, attempt)) is None
    assert len(await started_events(js)) == 1


async def test_a_start_that_loses_the_race_to_a_take_back_is_refused_and_the_attempt_is_stale(nc, js, tmp_path):
    seq = await submit_and_assign(js, "t1", command("true"))
    ctx, attempt = attempt_for(nc, js, tmp_path, seq)
    checked = await still_current(ctx, attempt)
    assert checked.stale is None
    await bus.publish(js, taken_back(), expected_seq=checked.seq)  # the coordinator, between check and start
    stale = await claim(ctx, attempt, checked)
    assert stale is not None and "TaskFailed attempt 1" in stale
    assert await started_events(js) == []


async def test_a_harmless_message_in_between_only_delays_the_start(nc, js, tmp_path):
    seq = await submit_and_assign(js, "t1", command("true"))
    ctx, attempt = attempt_for(nc, js, tmp_path, seq)
    checked = await still_current(ctx, attempt)
    await bus.publish(js, ev.TaskDeadlineMissed(run_id="r1", task_id="t1", deadline=ev.now(), status="assigned"))
    assert await claim(ctx, attempt, checked) is None
    assert len(await started_events(js)) == 1


async def test_a_take_back_after_the_start_is_refused_by_the_server(nc, js, tmp_path):
    seq = await submit_and_assign(js, "t1", command("true"))
    ctx, attempt = attempt_for(nc, js, tmp_path, seq)
    assert await claim(ctx, attempt, await still_current(ctx, attempt)) is None
    with pytest.raises(bus.Conflict):
        await bus.publish(js, taken_back(), expected_seq=seq)  # decided on a fold without the start
