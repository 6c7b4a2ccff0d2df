"""Scheduling policy (#3) as pure decisions: unschedulable tasks, dependency cycles, deadlines, and
what `submit --rerun-failed` resubmits. Folded and decided without a server, like the coordinator."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from itertools import pairwise

import pytest
from hypothesis import given
from hypothesis import strategies as st
from decision_log import DecisionLog
from test_schedule import CLUSTERS, clusters, meets

from dtf import events as ev
from dtf import schedule, subjects
from dtf.cli import progress
from dtf.cli import submit as sub
from dtf.spec import Requirements, SpecError, TaskSpec
from dtf.state import Fold, dependency_cycle, queue_order

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = schedule.Policy(heartbeat_timeout=timedelta(days=30))
"""Workers in these histories never heartbeat; they are not what is tested here."""


def Log() -> DecisionLog:  # noqa: N802 - reads as the log it returns
    return DecisionLog(POLICY)


def submitted(task_id: str, at: datetime = T0, **spec) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(id=f"s-{task_id}", time=at, run_id="r", task_id=task_id, submitter="a",
                            spec=TaskSpec(type="command", config={"command": "true"}, **spec))


def registered(worker_id: str, hardware=("cpu",), at: datetime = T0, **caps) -> ev.WorkerRegistered:
    return ev.WorkerRegistered(id=f"reg-{worker_id}-{at.timestamp()}", time=at, worker_id=worker_id, host="h",
                               pid=1, capabilities=ev.Capabilities(hardware=list(hardware), **caps))


def kinds(events: list[ev.Event]) -> list[str]:
    return [type(e).__name__ for e in events]


# --- unschedulable -------------------------------------------------------------------------------------


def test_a_task_no_registered_worker_can_run_is_reported_at_once_then_assigned_when_one_registers():
    log = Log()
    log.add(registered("w1"), submitted("t1", requirements=Requirements(hardware=["cuda", "rocm"])))
    [verdict] = log.settle(T0)
    assert isinstance(verdict, ev.TaskUnschedulable) and verdict.id == "unschedulable-t1-1"
    assert verdict.reason == "needs hardware cuda|rocm; no registered worker has it"
    assert log.fold.tasks["t1"].status == "unschedulable"
    assert log.settle(T0 + timedelta(minutes=5)) == []  # said once, not again while it stays so
    log.add(registered("gpu", hardware=["cpu", "cuda"], at=T0 + timedelta(minutes=6)))
    [assigned] = log.settle(T0 + timedelta(minutes=6))
    assert isinstance(assigned, ev.TaskAssigned) and (assigned.worker_id, assigned.attempt) == ("gpu", 1)


def test_an_unschedulable_task_that_comes_back_after_its_worker_left_is_reported_again_with_the_next_id():
    log = Log()
    log.add(registered("cpu"), submitted("t1", requirements=Requirements(hardware=["cuda"])))
    assert kinds(log.settle(T0)) == ["TaskUnschedulable"]
    log.add(registered("gpu", hardware=["cuda"]))
    assert kinds(log.settle(T0)) == ["TaskAssigned"]
    log.add(ev.WorkerLeft(id="left", time=T0, worker_id="gpu"))
    decisions = log.settle(T0 + timedelta(seconds=1))
    assert kinds(decisions) == ["TaskFailed", "TaskUnschedulable"]
    assert decisions[1].id == "unschedulable-t1-2"
    assert decisions[1].reason == "needs hardware cuda; no registered worker has it"


def test_when_every_worker_has_left_tasks_wait_the_grace_period_then_hear_no_workers_registered():
    log = Log()
    log.add(registered("w1"), submitted("t1"), ev.WorkerLeft(id="left", time=T0, worker_id="w1"))
    assert log.settle(T0 + timedelta(seconds=1)) == []
    [verdict] = log.settle(T0 + POLICY.no_workers_grace)
    assert (verdict.id, verdict.reason) == ("unschedulable-t1-1", "no workers registered")


def test_a_busy_capable_worker_makes_a_task_wait_but_not_unschedulable():
    log = Log()
    log.add(registered("w1"), submitted("t1"), submitted("t2"))
    assert kinds(log.settle(T0)) == ["TaskAssigned"]
    assert log.fold.tasks["t2"].status == "pending"


def test_with_no_worker_at_all_tasks_are_reported_only_after_the_grace_period_and_once():
    log = Log()
    log.add(submitted("t1"))
    assert log.decide(T0 + POLICY.no_workers_grace - timedelta(seconds=1)) == []
    [verdict] = log.settle(T0 + POLICY.no_workers_grace)
    assert verdict.reason == "no workers registered"
    assert log.settle(T0 + timedelta(hours=1)) == []


@pytest.mark.parametrize("req, reason", [
    (Requirements(min_memory_gb=128), "needs min_memory_gb 128; no registered worker has it"),
    (Requirements(hardware=["rocm"], tags={"pool": "x"}),
     "needs hardware rocm, tag pool=x; no registered worker has them"),
    (Requirements(hardware=["cuda"], min_memory_gb=32),
     "needs hardware cuda, min_memory_gb 32 together; no registered worker has all of them"),
    (Requirements(gpu_count=2, min_cuda_compute=9), "needs gpu_count 2, min_cuda_compute 9; no registered worker has them"),
])
def test_the_reason_names_what_no_worker_offers(req, reason):
    workers = [schedule.standing_workers(_one(registered("big", memory_gb=64)))[0],
               schedule.standing_workers(_one(registered("gpu", hardware=["cuda"], memory_gb=8)))[0]]
    assert schedule.unschedulable_reason(req, workers) == reason


def _one(event: ev.Event) -> Fold:
    fold = Fold()
    fold.apply(subjects.subject_for(event), 1, ev.encode(event))
    return fold


@CLUSTERS
@given(clusters())
def test_exactly_the_pending_tasks_no_standing_worker_could_ever_run_are_reported(cluster):
    fold = cluster.fold
    decisions = list(schedule.decide(fold, cluster_now(), "coord", schedule.Policy()))
    reported = {d.task_id for d in decisions if isinstance(d, ev.TaskUnschedulable)}
    cancelled = {d.task_id for d in decisions if isinstance(d, ev.TaskCancelled)}
    standing = [w for w in fold.workers.values() if w.status != "left" and w.registered_at is not None]
    expected = {
        t.task_id for t in fold.tasks.values()
        if t.status == "pending" and t.spec is not None and t.task_id not in cancelled
        and not any(meets(w.capabilities, t.spec.requirements) for w in standing)
    }
    assert reported == expected
    assigned = {d.task_id for d in decisions if isinstance(d, ev.TaskAssigned)}
    assert not reported & assigned


def cluster_now() -> datetime:
    from test_schedule import NOW
    return NOW


# --- dependencies ----------------------------------------------------------------------------------------


def test_a_task_depending_on_itself_is_rejected_with_the_cycle():
    log = Log()
    [accepted] = log.add(submitted("t1", dependencies=["t1"]))
    assert accepted is None
    [rejection] = log.settle(T0)
    assert isinstance(rejection, ev.TaskRejected) and rejection.reason == "dependency cycle: t1 -> t1"
    assert log.fold.tasks["t1"].status == "rejected"


def test_a_submission_closing_a_cycle_is_rejected_and_the_task_waiting_on_it_is_cancelled():
    log = Log()
    log.add(registered("w1"), submitted("a", dependencies=["b"]))  # b unknown yet: a waits
    assert log.settle(T0) == [] and log.fold.tasks["a"].status == "pending"
    log.add(submitted("c", dependencies=["a"]), submitted("b", dependencies=["c"]))
    decisions = log.settle(T0)
    assert kinds(decisions) == ["TaskRejected", "TaskCancelled", "TaskCancelled"]
    assert decisions[0].task_id == "b" and decisions[0].reason == "dependency cycle: b -> c -> a -> b"
    assert log.fold.tasks["a"].reason == "dependency b ended rejected"
    assert log.fold.tasks["c"].reason == "dependency a ended cancelled"


@given(st.lists(st.tuples(st.integers(0, 7), st.lists(st.integers(0, 7), max_size=3, unique=True)),
                max_size=12))
def test_the_accepted_dependency_graph_never_has_a_cycle_and_each_rejection_names_one(submissions):
    log = Log()
    for i, (node, deps) in enumerate(submissions):
        event = submitted(f"n{node}", at=T0 + timedelta(seconds=i), dependencies=[f"n{d}" for d in deps])
        [accepted] = log.add(event)
        if accepted is None and f"n{node}" not in log.fold.tasks:
            reason = log.fold.invalid[len(log.messages)].reason
            cycle = reason.removeprefix("dependency cycle: ").split(" -> ")
            assert cycle[0] == cycle[-1] == f"n{node}"
            for a, b in pairwise(cycle):
                deps_of = event.spec.dependencies if a == f"n{node}" else log.fold.tasks[a].spec.dependencies
                assert b in deps_of
    graph = {t.task_id: t.spec.dependencies for t in log.fold.tasks.values() if t.spec is not None}
    for task_id, deps in graph.items():
        assert dependency_cycle(task_id, deps, {k: v for k, v in log.fold.tasks.items()
                                                          if k != task_id}) is None


def test_a_dependant_is_assigned_only_after_its_dependency_passed():
    log = Log()
    log.add(registered("w1"), submitted("build"), submitted("test", dependencies=["build"], priority=0))
    [first] = log.settle(T0)
    assert first.task_id == "build"
    log.add(ev.ResultReported(id="ok", time=T0, run_id="r", task_id="build", attempt=1, worker_id="w1",
                              outcome="passed"))
    [second] = log.settle(T0)
    assert second.task_id == "test"


# --- deadlines ----------------------------------------------------------------------------------------


def test_earliest_deadline_goes_first_among_equal_priority_and_priority_still_wins():
    log = Log()
    log.add(registered("w1"),
            submitted("none", at=T0),
            submitted("late", at=T0 + timedelta(seconds=1), deadline=T0 + timedelta(hours=2)),
            submitted("soon", at=T0 + timedelta(seconds=2), deadline=T0 + timedelta(hours=1)),
            submitted("urgent", at=T0 + timedelta(seconds=3), priority=1))
    ready = [t for t in log.fold.tasks.values()]
    assert [t.task_id for t in sorted(ready, key=queue_order)] == ["urgent", "soon", "late", "none"]


@given(st.lists(st.tuples(st.integers(0, 2), st.none() | st.integers(0, 100)), min_size=1, max_size=10))
def test_dispatch_order_follows_priority_then_deadline(tasks):
    log = Log()
    log.add(ev.WorkerRegistered(id="reg", time=T0, worker_id="w1", host="h", pid=1, concurrency=len(tasks)))
    for i, (priority, minutes) in enumerate(tasks):
        deadline = None if minutes is None else T0 + timedelta(minutes=minutes + 1)
        log.add(submitted(f"t{i}", at=T0, priority=priority, deadline=deadline))
    order = [d.task_id for d in log.decide(T0) if isinstance(d, ev.TaskAssigned)]
    keys = [(tasks[int(t[1:])][0], tasks[int(t[1:])][1] is None, tasks[int(t[1:])][1] or 0) for t in order]
    assert len(order) == len(tasks) and keys == sorted(keys)


def test_a_missed_deadline_is_recorded_once_and_the_task_goes_on():
    log = Log()
    log.add(registered("w1"), submitted("t1", deadline=T0 + timedelta(minutes=1)))
    assert kinds(log.settle(T0)) == ["TaskAssigned"]
    log.add(ev.TaskStarted(id="st", time=T0, run_id="r", task_id="t1", attempt=1, worker_id="w1"))
    assert log.decide(T0 + timedelta(minutes=1)) == []  # not yet: exactly at the deadline
    [missed] = log.settle(T0 + timedelta(minutes=2))
    assert isinstance(missed, ev.TaskDeadlineMissed) and missed.id == "deadline-t1"
    assert (missed.deadline, missed.status) == (T0 + timedelta(minutes=1), "running")
    task = log.fold.tasks["t1"]
    assert task.status == "running" and task.deadline_missed == T0 + timedelta(minutes=2)
    assert sub.task_summary(task)["reason"] == "missed its deadline 2026-01-01T00:01:00Z"
    assert log.settle(T0 + timedelta(hours=1)) == []
    log.add(ev.ResultReported(id="ok", time=T0, run_id="r", task_id="t1", attempt=1, worker_id="w1",
                              outcome="passed"))
    assert log.fold.tasks["t1"].status == "passed"


def test_a_queued_task_past_its_deadline_is_marked_first_and_assigned_in_the_next_round():
    log = Log()
    log.add(registered("w1"), submitted("t1", deadline=T0))
    decisions = log.settle(T0 + timedelta(seconds=1))
    assert kinds(decisions) == ["TaskDeadlineMissed", "TaskAssigned"]
    assert decisions[0].status == "pending"


def test_deciding_with_deadlines_and_unschedulable_tasks_is_the_same_on_a_refolded_log():
    log = Log()
    log.add(registered("w1"), submitted("a", deadline=T0), submitted("b", requirements=Requirements(
        hardware=["mps"])), submitted("c", dependencies=["c"]))
    at = T0 + timedelta(seconds=5)
    log.settle(at)
    again = Fold()
    for subject, seq, data in log.messages:
        again.apply(subject, seq, data)
    assert again.tasks == log.fold.tasks
    assert [ev.encode(d) for d in schedule.decide(again, at + timedelta(hours=1), "c")] == \
        [ev.encode(d) for d in schedule.decide(log.fold, at + timedelta(hours=1), "c")]


@pytest.mark.parametrize("text, expected", [
    ("30m", T0 + timedelta(minutes=30)),
    ("2h", T0 + timedelta(hours=2)),
    ("1.5d", T0 + timedelta(days=1.5)),
    ("90s", T0 + timedelta(seconds=90)),
    ("2026-02-01T18:00:00Z", datetime(2026, 2, 1, 18, tzinfo=UTC)),
    ("2026-02-01T18:00:00+02:00", datetime(2026, 2, 1, 16, tzinfo=UTC)),
])
def test_deadlines_are_given_from_now_or_as_a_time(text, expected):
    assert sub.parse_deadline(text, T0) == expected


def test_a_deadline_without_an_offset_is_local_time_and_garbage_is_refused():
    local = sub.parse_deadline("2026-02-01T18:00:00", T0)
    assert local.tzinfo == UTC and local == datetime(2026, 2, 1, 18).astimezone().astimezone(UTC)
    with pytest.raises(SpecError, match="neither a time"):
        sub.parse_deadline("tomorrow-ish", T0)


# --- following a run -------------------------------------------------------------------------------------


def test_the_unschedulable_reason_is_printed_once_and_tasks_with_the_same_reason_share_a_line():
    log = Log()
    log.add(registered("w1"), *(submitted(f"t{i}", requirements=Requirements(hardware=["cuda"])) for i in range(3)))
    log.settle(T0)
    seen: set = set()
    lines = progress.notices(list(log.fold.tasks.values()), seen)
    assert lines == ["dtf: unschedulable, still waiting: t0, t1, t2: needs hardware cuda; no registered worker has it"]
    assert progress.notices(list(log.fold.tasks.values()), seen) == []
    assert sub.unsettled(list(log.fold.tasks.values()))[0] == \
        "t0 unschedulable: needs hardware cuda; no registered worker has it"


# --- rerun failed ---------------------------------------------------------------------------------------


def test_rerunning_a_run_resubmits_only_what_did_not_pass_and_only_the_failed_tests():
    log = Log()
    test_spec = {"type": "test", "config": {"paths": ["suite/test_a.py"]}}
    events = [
        ev.TaskSubmitted(id="s1", time=T0, run_id="r", task_id="tests", submitter="a", spec=TaskSpec(**test_spec)),
        submitted("ok", at=T0 + timedelta(seconds=1)),
        submitted("broken", at=T0 + timedelta(seconds=2)),
        submitted("after", at=T0 + timedelta(seconds=3), dependencies=["broken", "ok"]),
    ]
    log.add(registered("w1"), *events)
    attempt = {"time": T0, "run_id": "r", "attempt": 1, "worker_id": "w1"}
    for task_id, outcome, tests in [
        ("tests", "failed", [ev.TestOutcome(nodeid="test_a.py::test_x", outcome="failed"),
                             ev.TestOutcome(nodeid="test_a.py::test_y", outcome="passed")]),
        ("ok", "passed", []), ("broken", "failed", []),
    ]:
        log.add(ev.TaskAssigned(id=f"as-{task_id}", task_id=task_id, **attempt, coordinator="c",
                                spec=log.fold.tasks[task_id].spec))
        log.add(ev.ResultReported(id=f"res-{task_id}", task_id=task_id, **attempt, outcome=outcome, tests=tests))
    log.settle(T0)
    assert log.fold.tasks["after"].status == "cancelled"
    fold, results = sub.last_results(log.messages)
    old_ids, specs = sub.rerun_specs(list(fold.tasks.values()), results)
    assert old_ids == ["tests", "broken", "after"]
    assert specs[0].config["paths"] == ["suite/test_a.py::test_x"]  # rebased onto the task's own path
    resubmitted = sub.remap_dependencies(sub.submissions("r2", specs, "a", ""), old_ids)
    assert resubmitted[2].spec.dependencies == ["r2-2", "ok"]


def test_a_rerun_falls_back_to_the_whole_task_when_the_failed_tests_are_unknown():
    log = Log()
    spec = TaskSpec(type="test", config={"paths": ["tests"]})
    log.add(registered("w1"), ev.TaskSubmitted(id="s", time=T0, run_id="r", task_id="t", submitter="a", spec=spec))
    a = {"time": T0, "run_id": "r", "task_id": "t", "attempt": 1, "worker_id": "w1"}
    log.add(ev.TaskAssigned(id="as", **a, coordinator="c", spec=spec),
            ev.ResultReported(id="res", **a, outcome="failed", tests_ref="results/t/1.json"))
    fold, results = sub.last_results(log.messages)
    assert sub.rerun_specs(list(fold.tasks.values()), results) == (["t"], [spec])
