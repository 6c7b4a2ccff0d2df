"""The fold's scheduling indexes (`Fold.queues`) are kept as the log goes so a round never scans every
task; here they must always equal the same indexes rebuilt from scratch from the folded tasks, through
random histories of submissions, decisions, results, failures, releases, preemptions and attempts
failed for not starting."""

from __future__ import annotations

from datetime import timedelta

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from test_schedule import NOW, RUN, Cluster, clusters

from dtf import events as ev
from dtf import schedule
from dtf.spec import RetryPolicy, TaskSpec
from dtf.state import QUEUED, TERMINAL, Fold


def rebuilt(fold: Fold) -> dict:
    """The indexes as their definitions say, from the tasks alone."""
    lanes: dict[str, set[str]] = {}
    doomed, deadlines, unstarted = set(), set(), set()
    pending: dict[bytes, set[str]] = {}
    for task in fold.tasks.values():
        if task.spec is None:
            continue
        deps = [fold.tasks.get(dep) for dep in task.spec.dependencies]
        if task.status in QUEUED:
            if all(dep is not None and dep.status == "passed" for dep in deps):
                lanes.setdefault(task.project, set()).add(task.task_id)
            if any(dep is not None and dep.status in TERMINAL and dep.status != "passed" for dep in deps):
                doomed.add(task.task_id)
        if task.status == "pending":
            pending.setdefault(msgspec.json.encode(task.spec.requirements), set()).add(task.task_id)
        if task.status not in TERMINAL and task.spec.deadline is not None and task.deadline_missed is None:
            deadlines.add((task.spec.deadline, task.task_id))
        if task.status == "assigned":
            unstarted.add((task.assigned_at, task.task_id))
    return {"lanes": lanes, "doomed": doomed, "pending": pending, "deadlines": deadlines, "unstarted": unstarted}


def kept(fold: Fold) -> dict:
    queues = fold.queues
    return {
        "lanes": {p: {key[-1] for key in lane} for p, lane in queues.lanes.items() if lane},
        "doomed": set(queues.doomed),
        "pending": {key: set(ids) for key, ids in queues.pending.items() if ids},
        "deadlines": set(queues.deadlines),
        "unstarted": set(queues.unstarted),
    }


OUTCOMES = ("none", "started", "passed", "failed", "error", "released", "lost")


def finish(cluster: Cluster, task_id: str, outcome: str) -> None:
    task = cluster.fold.tasks[task_id]
    a = {"time": NOW, "run_id": RUN, "task_id": task_id, "attempt": task.attempt, "worker_id": task.worker_id}
    n = task.attempt
    if outcome == "started" and task.status == "assigned":
        cluster.publish(ev.TaskStarted(id=f"st-{task_id}-{n}", **a))
    elif outcome in ("passed", "failed", "error"):
        cluster.publish(ev.ResultReported(id=f"res-{task_id}-{n}", **a, outcome=outcome))
    elif outcome == "released":
        cluster.publish(ev.TaskReleased(id=f"rel-{task_id}-{n}", **a, reason="preempted"))
    elif outcome == "lost":
        cluster.publish(ev.TaskFailed(id=f"fail-{task_id}-{n}", **a, category="worker", reason="lost"))


@settings(max_examples=60, deadline=None)
@given(clusters(), st.data())
def test_the_kept_indexes_always_equal_indexes_rebuilt_from_the_tasks(cluster, data):
    assert kept(cluster.fold) == rebuilt(cluster.fold)
    for step in range(data.draw(st.integers(1, 6))):
        for n in range(data.draw(st.integers(0, 3))):
            known = sorted(cluster.fold.tasks)
            deadline = data.draw(st.none() | st.integers(-60, 60).map(lambda s: NOW + timedelta(seconds=s)))
            spec = TaskSpec(type="command", config={"command": "x"}, priority=data.draw(st.integers(0, 3)),
                            dependencies=data.draw(st.lists(st.sampled_from(known), max_size=2, unique=True)),
                            deadline=deadline, retry_policy=RetryPolicy(max_retries=1, retry_delay_seconds=0))
            cluster.publish(ev.TaskSubmitted(
                id=f"sub-x{step}-{n}", time=NOW, run_id=RUN, task_id=f"x{step}-{n}", submitter="alice",
                project=data.draw(st.sampled_from(["", "p", "q"])), spec=spec))
        for decision in schedule.decide(cluster.fold, NOW, "coord", schedule.Policy()):
            cluster.publish(decision)
        for worker_tasks in list(cluster.fold.active.values()):
            for task_id in sorted(worker_tasks):
                finish(cluster, task_id, data.draw(st.sampled_from(OUTCOMES)))
        assert kept(cluster.fold) == rebuilt(cluster.fold)
    assert kept(cluster.refold()) == kept(cluster.fold)
