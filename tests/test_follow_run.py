"""`dtf submit --wait` / `dtf wait` follow a run through the log until every task is settled: against a
real server, with the run's events published as the coordinator and a submitter would."""

from __future__ import annotations

import asyncio

import pytest

from dtf import events as ev
from dtf.cli import submit as sub
from dtf.spec import TaskSpec
from dtf.streams import bus

TASKS = 300


def cancelled(event: ev.TaskSubmitted) -> ev.TaskCancelled:
    return ev.TaskCancelled(id=f"cancel-{event.task_id}", run_id=event.run_id, task_id=event.task_id,
                            reason="not needed", by=event.submitter)


async def test_following_a_run_ends_when_its_last_task_settles_and_shows_progress_sparingly(js, monkeypatch):
    monkeypatch.setattr(sub, "PROGRESS_EVERY_S", 0.05)
    submitted = sub.submissions("run-f", [TaskSpec(type="command", config={"command": "true"})] * TASKS,
                                "sam", "sam")
    await sub.submit_run(js, submitted)
    shown: list[list] = []
    follower = asyncio.create_task(sub.follow_run(js, "run-f", shown.append))
    for event in submitted:  # one at a time, so the follow catches up again and again
        await bus.publish(js, cancelled(event))
    tasks = await asyncio.wait_for(follower, 60)
    assert len(tasks) == TASKS and all(t.status == "cancelled" for t in tasks)
    assert shown and len(shown) < TASKS  # at most one showing per 0.05 s, not one per event
    assert sum(t.terminal for t in shown[-1]) == TASKS  # the last showing is the settled run


async def test_a_change_held_back_is_shown_when_its_time_is_up(js, monkeypatch):
    monkeypatch.setattr(sub, "PROGRESS_EVERY_S", 0.5)
    first, second = sub.submissions("run-g", [TaskSpec(type="command", config={"command": "true"})] * 2,
                                    "sam", "sam")
    await sub.submit_run(js, [first, second])
    shown: list[int] = []
    follower = asyncio.create_task(
        sub.follow_run(js, "run-g", lambda tasks: shown.append(sum(t.terminal for t in tasks))))
    try:
        for _ in range(100):
            if shown:
                break
            await asyncio.sleep(0.02)
        await bus.publish(js, cancelled(first))  # within 0.5 s of the first showing: held back
        for _ in range(100):
            if shown[-1] == 1:
                break
            await asyncio.sleep(0.02)
        assert shown[-1] == 1  # shown once its time was up, with no further event to prompt it
        assert not follower.done()
    finally:
        await bus.publish(js, cancelled(second))
    assert len(await asyncio.wait_for(follower, 30)) == 2
    assert shown[-1] == 2


async def test_a_follow_that_times_out_returns_the_states_so_far(js):
    [only] = sub.submissions("run-h", [TaskSpec(type="command", config={"command": "true"})], "sam", "sam")
    await sub.submit_run(js, [only])
    with pytest.raises(sub.WaitTimeout) as raised:
        await sub.follow_run(js, "run-h", None, 0.3)
    assert [(t.task_id, t.terminal) for t in raised.value.tasks] == [(only.task_id, False)]


async def test_a_follow_expecting_new_tasks_waits_for_them_though_the_runs_earlier_tasks_are_done(js):
    spec = TaskSpec(type="command", config={"command": "true"})
    [earlier] = sub.submissions("run-e", [spec], "sam", "sam")
    await sub.submit_run(js, [earlier])
    await bus.publish(js, cancelled(earlier))
    later = ev.TaskSubmitted(id="submit-run-e-2", run_id="run-e", task_id="run-e-2", submitter="sam", spec=spec)
    shown: list[list] = []
    follower = asyncio.create_task(sub.follow_run(js, "run-e", shown.append, expect=[later.task_id]))
    for _ in range(500):  # until the follow has caught up with the log as it is: the earlier task, settled
        if shown:
            break
        await asyncio.sleep(0.02)
    assert [t.task_id for t in shown[-1]] == ["run-e-1"] and not follower.done()
    await bus.publish(js, later)  # stored only now, as a submitter's feed shows it a little late
    await bus.publish(js, cancelled(later))
    tasks = await asyncio.wait_for(follower, 30)
    assert sorted((t.task_id, t.status) for t in tasks) == [("run-e-1", "cancelled"), ("run-e-2", "cancelled")]
