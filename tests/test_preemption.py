"""Preemption (#3): urgent work with no capable free worker takes the slot of a running, strictly less
urgent attempt. The coordinator asks for it back (TaskPreempted), the worker kills the attempt and
hands it back (TaskReleased), and the preempted task is requeued without using a retry."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime, timedelta

from decision_log import DecisionLog
from hypothesis import given
from hypothesis import strategies as st
from test_schedule import CLUSTERS, NOW, RUN, clusters, meets

from dtf import events as ev
from dtf import schedule, subjects
from dtf.cli.coordinator import Coordinator
from dtf.spec import Requirements, TaskSpec
from dtf.streams import bus, topology
from dtf.workers.agent import WorkerAgent

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = schedule.Policy(heartbeat_timeout=timedelta(days=30))


def submitted(task_id: str, priority: int, at: datetime = T0, **spec) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(id=f"s-{task_id}", time=at, run_id="r", task_id=task_id, submitter="a",
                            spec=TaskSpec(type="command", config={"command": "x"}, priority=priority, **spec))


def registered(worker_id: str, concurrency: int = 1, hardware=("cpu",)) -> ev.WorkerRegistered:
    return ev.WorkerRegistered(id=f"reg-{worker_id}", time=T0, worker_id=worker_id, host="h", pid=1,
                               concurrency=concurrency, capabilities=ev.Capabilities(hardware=list(hardware)))


def running(log: DecisionLog, task_id: str, worker_id: str, at: datetime) -> None:
    task = log.fold.tasks[task_id]
    a = {"time": at, "run_id": "r", "task_id": task_id, "attempt": task.attempt + 1, "worker_id": worker_id}
    log.add(ev.TaskAssigned(id=f"as-{task_id}-{a['attempt']}", **a, coordinator="c", spec=task.spec),
            ev.TaskStarted(id=f"st-{task_id}-{a['attempt']}", **a))


def busy_worker(*tasks: tuple[str, int]) -> DecisionLog:
    """w1 with one slot per task, each running one of `tasks` (id, priority), started in that order."""
    log = DecisionLog(POLICY)
    log.add(registered("w1", concurrency=len(tasks)))
    for n, (task_id, priority) in enumerate(tasks):
        log.add(submitted(task_id, priority))
        running(log, task_id, "w1", T0 + timedelta(seconds=n + 1))
    return log


def of(kind: type, decisions: list[ev.Event]) -> list:
    return [d for d in decisions if isinstance(d, kind)]


def test_urgent_work_preempts_the_least_urgent_running_attempt_and_only_one():
    log = busy_worker(("low7", 7), ("low6", 6), ("later7", 7))
    log.add(submitted("urgent", 1))
    decisions = log.decide(T0 + timedelta(minutes=1))
    [preempted] = of(ev.TaskPreempted, decisions)
    assert (preempted.task_id, preempted.attempt, preempted.worker_id, preempted.by_task) == ("later7", 1, "w1", "urgent")
    assert preempted.id == "preempt-later7-1" and "urgent" in preempted.reason
    assert not of(ev.TaskAssigned, decisions), "the slot is not free until the attempt is handed back"


def test_while_an_attempt_is_being_handed_back_nothing_else_is_preempted_for_the_same_slot():
    log = busy_worker(("low7", 7), ("low6", 6))
    log.add(submitted("urgent", 1))
    at = T0 + timedelta(minutes=1)
    log.add(*log.decide(at))
    assert log.fold.tasks["low7"].preempting and log.fold.tasks["low7"].status == "running"
    assert log.decide(at) == []


def test_the_handed_back_slot_goes_to_the_urgent_task_and_the_preempted_one_is_requeued_without_a_retry():
    log = busy_worker(("low", 7))
    log.add(submitted("urgent", 1))
    at = T0 + timedelta(minutes=1)
    [preempted] = log.decide(at)
    log.add(preempted)
    log.add(ev.TaskReleased(id="released-low-1", time=at, run_id="r", task_id="low", attempt=1, worker_id="w1",
                            reason=preempted.reason))
    low = log.fold.tasks["low"]
    assert (low.status, low.failures, low.not_before, low.preempting) == ("pending", 0, None, False)
    assert [(d.task_id, d.worker_id) for d in log.decide(at)] == [("urgent", "w1")]
    log.add(*log.decide(at))
    running_urgent = log.fold.tasks["urgent"]
    log.add(ev.ResultReported(id="res-urgent", time=at, run_id="r", task_id="urgent", attempt=1, worker_id="w1",
                              outcome="passed"))
    assert running_urgent.status == "assigned"
    [again] = log.decide(at)
    assert (type(again), again.task_id, again.attempt) == (ev.TaskAssigned, "low", 2)


def test_a_result_that_beats_the_preemption_settles_the_task_as_usual():
    log = busy_worker(("low", 7))
    log.add(submitted("urgent", 1))
    at = T0 + timedelta(minutes=1)
    log.add(*log.decide(at))
    log.add(ev.ResultReported(id="res-low", time=at, run_id="r", task_id="low", attempt=1, worker_id="w1",
                              outcome="passed"))
    assert log.fold.tasks["low"].status == "passed"
    assert [(type(d), d.task_id) for d in log.decide(at)] == [(ev.TaskAssigned, "urgent")]


def test_equal_or_lower_urgency_never_preempts():
    log = busy_worker(("running", 5))
    log.add(submitted("same", 5), submitted("less", 9))
    assert log.decide(T0 + timedelta(minutes=1)) == []


def test_a_free_capable_worker_elsewhere_is_used_instead_of_preempting():
    log = busy_worker(("low", 7))
    log.add(registered("w2"), submitted("urgent", 1))
    assert [(type(d), d.task_id, d.worker_id) for d in log.decide(T0 + timedelta(minutes=1))] == \
        [(ev.TaskAssigned, "urgent", "w2")]


def test_only_workers_able_to_run_the_urgent_task_are_preempted():
    log = busy_worker(("low", 7))
    log.add(registered("gpu", hardware=("cpu", "cuda")), submitted("gpu-low", 8, requirements=Requirements(hardware=["cuda"])))
    running(log, "gpu-low", "gpu", T0)
    log.add(submitted("urgent-gpu", 1, requirements=Requirements(hardware=["cuda"])))
    [preempted] = log.decide(T0 + timedelta(minutes=1))
    assert (preempted.task_id, preempted.worker_id) == ("gpu-low", "gpu")


def test_a_draining_worker_is_not_preempted_since_it_would_not_take_the_urgent_task():
    log = busy_worker(("low", 7))
    log.add(ev.WorkerDrainRequested(id="drain", time=T0, worker_id="w1"), submitted("urgent", 1))
    assert log.decide(T0 + timedelta(minutes=1)) == []


def test_only_a_running_attempt_is_preempted_not_one_still_starting():
    log = DecisionLog(POLICY)
    log.add(registered("w1"), submitted("low", 7))
    log.add(*log.decide(T0))
    log.add(submitted("urgent", 1))
    assert log.decide(T0 + timedelta(minutes=1)) == []


@CLUSTERS
@given(clusters(), st.integers(0, 3))
def test_each_preemption_frees_a_capable_slot_for_strictly_more_urgent_ready_work(cluster, priority):
    cluster.publish(ev.TaskSubmitted(id="sub-urgent", time=NOW - timedelta(minutes=1), run_id=RUN, task_id="urgent",
                                     submitter="alice", spec=TaskSpec(type="command", config={"command": "x"},
                                                                    priority=priority)))
    fold = cluster.fold
    decisions = list(schedule.decide(fold, NOW, "coord", schedule.Policy()))
    preempted = of(ev.TaskPreempted, decisions)
    assigned = {d.task_id for d in of(ev.TaskAssigned, decisions)}
    assert len({p.task_id for p in preempted}) == len(preempted), "an attempt is asked back once"
    assert len({p.by_task for p in preempted}) == len(preempted), "one slot per urgent task"
    free = schedule.free_slots(fold, NOW, schedule.Policy())
    for p in preempted:
        victim, urgent = fold.tasks[p.task_id], fold.tasks[p.by_task]
        assert victim.status == "running" and not victim.preempting and p.attempt == victim.attempt
        assert victim.spec.priority > urgent.spec.priority
        assert urgent.task_id not in assigned and urgent.status in ("pending", "unschedulable")
        worker = fold.workers[p.worker_id]
        assert p.worker_id == victim.worker_id and meets(worker.capabilities, urgent.spec.requirements)
        assert schedule.slots(worker, 0, NOW, schedule.Policy()) > 0, "the worker would take the urgent task"
        assigned_to = {wid: sum(d.worker_id == wid for d in of(ev.TaskAssigned, decisions)) for wid in free}
        assert not any(free[w] > assigned_to[w] and meets(fold.workers[w].capabilities, urgent.spec.requirements)
                       for w in free), "no capable worker had a free slot left"


# --- against a real server ---------------------------------------------------------------------------------

SAFETY_S = 60.0
"""Only a guard against hanging forever; nothing here asserts on time."""


async def first(js, predicate) -> ev.Event:
    async def scan() -> ev.Event:
        reader = bus.read(js, topology.EVENTS, [subjects.TASKS], follow=True)
        async with contextlib.aclosing(reader):
            async for msg in reader:
                event = ev.decode(msg.data)
                if predicate(event):
                    return event
        raise AssertionError("the stream ended")
    return await asyncio.wait_for(scan(), SAFETY_S)


def command(task_id: str, cmd: str, priority: int) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(run_id="r1", task_id=task_id, submitter="alice",
                            spec=TaskSpec(type="command", config={"command": cmd}, priority=priority))


async def test_a_worker_kills_and_hands_back_a_preempted_attempt_and_the_urgent_task_runs_in_its_slot(nc, js, tmp_path):
    stop = asyncio.Event()
    agent = WorkerAgent(nc, worker_id="w1", concurrency=1, cache_dir=tmp_path / "cache", workdir=tmp_path,
                        heartbeat_interval=0.5, fetch_timeout=0.2)
    running_parts = [asyncio.create_task(Coordinator(nc, "c").run(stop)), asyncio.create_task(agent.run(stop))]
    try:
        await bus.publish(js, command("slow", "sleep 600", priority=7))
        await first(js, lambda e: isinstance(e, ev.TaskStarted) and e.task_id == "slow")
        await bus.publish(js, command("urgent", "true", priority=1))

        preempted = await first(js, lambda e: isinstance(e, ev.TaskPreempted))
        released = await first(js, lambda e: isinstance(e, ev.TaskReleased) and e.task_id == "slow")
        result = await first(js, lambda e: isinstance(e, ev.ResultReported) and e.task_id == "urgent")
        again = await first(js, lambda e: isinstance(e, ev.TaskAssigned) and e.task_id == "slow" and e.attempt == 2)

        assert (preempted.task_id, preempted.attempt, preempted.by_task) == ("slow", 1, "urgent")
        assert released.attempt == 1 and "preempted for urgent" in released.reason
        assert (result.outcome, result.worker_id) == ("passed", "w1")
        assert again.worker_id == "w1", "the preempted task is requeued and runs again once the slot is free"
        await bus.publish(js, ev.TaskCancelled(run_id="r1", task_id="slow", by="alice", reason="done testing"))
        await first(js, lambda e: isinstance(e, ev.ResultReported) and e.task_id == "slow")
    finally:
        stop.set()
        _, stuck = await asyncio.wait(running_parts, timeout=SAFETY_S)
        for part in stuck:  # not what this test is about; a second cancel ends a swallowed first one
            part.cancel()
        await asyncio.gather(*running_parts, return_exceptions=True)
    stored = [ev.decode(m.data) async for m in bus.read(js, topology.EVENTS, ["dtf.task.r1.slow.>"])]
    assert not [e for e in stored if isinstance(e, ev.ResultReported) and e.attempt == 1], \
        "the preempted attempt reports no result: its process was killed and the attempt handed back"
    assert not [e for e in stored if isinstance(e, ev.TaskFailed)], "a preemption is not a failure"
