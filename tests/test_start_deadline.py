"""The start deadline (`schedule.not_started`): an attempt assigned to a worker that is still there but
never started is taken back once `Policy.start_deadline` has passed, exactly once, never for an
attempt that started and never before its deadline; the fold requeues the task without using a retry,
and the old attempt's late start or result changes nothing. Properties over the generated clusters of
tests/test_schedule.py, stepped through time."""

from __future__ import annotations

from datetime import timedelta

from hypothesis import given
from hypothesis import strategies as st
from test_schedule import CLUSTERS, NOW, RUN, T0, Cluster, clusters

from dtf import events as ev
from dtf import schedule
from dtf.spec import TaskSpec

deadlines = st.integers(1, 600).map(lambda s: timedelta(seconds=s))


def unstarted(decisions) -> list[ev.TaskFailed]:
    return [d for d in decisions if isinstance(d, ev.TaskFailed) and d.id.startswith("unstarted-")]


@CLUSTERS
@given(clusters(), deadlines, st.integers(0, 900))
def test_only_attempts_never_started_past_their_deadline_on_a_worker_still_there_are_taken_back(cluster, deadline, at):
    now = T0 + timedelta(seconds=at)
    policy = schedule.Policy(start_deadline=deadline)
    fold = cluster.fold
    taken = {(d.task_id, d.attempt): d for d in unstarted(schedule.decide(fold, now, "coord", policy))}
    due = {
        (t.task_id, t.attempt) for t in fold.tasks.values()
        if t.status == "assigned" and now - t.assigned_at > deadline
        and (t.worker_id not in fold.workers or fold.workers[t.worker_id].status not in ("lost", "left"))
    }
    assert set(taken) == due
    for (task_id, attempt), d in taken.items():
        task = fold.tasks[task_id]
        assert task.status == "assigned" and task.started_at is None, "never for a started attempt"
        assert now - task.assigned_at > deadline, "never before the deadline"
        assert d.id == f"unstarted-{task_id}-{attempt}" and d.category == "worker"
        assert d.worker_id == task.worker_id and d.time == now


@CLUSTERS
@given(clusters(), deadlines, st.integers(0, 900))
def test_replicas_that_folded_the_same_log_take_back_the_same_attempts_with_the_same_events(cluster, deadline, at):
    now, policy = T0 + timedelta(seconds=at), schedule.Policy(start_deadline=deadline)
    ours = unstarted(schedule.decide(cluster.fold, now, "coord-a", policy))
    theirs = unstarted(schedule.decide(cluster.refold(), now, "coord-b", policy))
    assert [ev.encode(d) for d in ours] == [ev.encode(d) for d in theirs]


@CLUSTERS
@given(clusters(), deadlines, st.data())
def test_through_time_each_attempt_is_taken_back_at_most_once_and_never_after_it_started(cluster, deadline, data):
    """Rounds at increasing times, each publishing every decision, with workers starting some of
    their assignments between rounds, as the coordinator and the workers would."""
    policy = schedule.Policy(start_deadline=deadline)
    started: set[tuple[str, int]] = {(t.task_id, t.attempt) for t in cluster.fold.tasks.values() if t.started_at}
    taken: list[tuple[str, int]] = []
    now = T0
    for _ in range(data.draw(st.integers(1, 8))):
        now += timedelta(seconds=data.draw(st.integers(0, 300)))
        for d in schedule.decide(cluster.fold, now, "coord", policy):
            if isinstance(d, ev.TaskFailed) and d.id.startswith("unstarted-"):
                assert (d.task_id, d.attempt) not in started
                assert now - cluster.fold.tasks[d.task_id].assigned_at > deadline
                taken.append((d.task_id, d.attempt))
            cluster.publish(d)
        for task in list(cluster.fold.tasks.values()):
            if task.status == "assigned" and data.draw(st.booleans()):
                cluster.publish(ev.TaskStarted(
                    id=f"st-{task.task_id}-{task.attempt}", time=now, run_id=RUN, task_id=task.task_id,
                    attempt=task.attempt, worker_id=task.worker_id))
                started.add((task.task_id, task.attempt))
    assert len(taken) == len(set(taken)), "exactly once per attempt"


def assigned_never_started() -> tuple[Cluster, ev.Event]:
    cluster = Cluster()
    cluster.publish(ev.WorkerRegistered(id="reg-w1", time=T0, worker_id="w1", host="h", pid=1, concurrency=1))
    spec = TaskSpec(type="command", config={"command": "true"})
    cluster.publish(ev.TaskSubmitted(id="sub-t1", time=T0, run_id=RUN, task_id="t1", submitter="alice", spec=spec))
    [assignment] = schedule.decide(cluster.fold, T0, "coord")
    cluster.publish(assignment)
    return cluster, assignment


def heartbeat(cluster: Cluster, at) -> None:
    cluster.fold.apply_event(ev.WorkerHeartbeat(id=f"hb-{at.timestamp()}", time=at, worker_id="w1"))


def test_an_attempt_is_not_taken_back_while_its_deadline_has_not_passed():
    cluster, _ = assigned_never_started()
    deadline = schedule.Policy().start_deadline
    heartbeat(cluster, T0 + deadline)
    assert list(schedule.decide(cluster.fold, T0 + deadline, "coord")) == []


def test_a_taken_back_attempt_requeues_its_task_without_a_retry_and_its_late_start_and_result_change_nothing():
    cluster, _ = assigned_never_started()
    later = T0 + schedule.Policy().start_deadline + timedelta(seconds=1)
    heartbeat(cluster, later)
    [failure] = list(schedule.decide(cluster.fold, later, "coord"))
    assert failure.id == "unstarted-t1-1" and failure.reason.startswith("attempt 1 not started within 60s")
    cluster.publish(failure)
    task = cluster.fold.tasks["t1"]
    assert (task.status, task.attempt, task.failures, task.lost) == ("pending", 1, 0, 1)
    assert task.reason.startswith("worker: attempt 1 not started")
    assert cluster.fold.workers["w1"].infra_failures == 1, "counted like any attempt lost with its worker"
    a = {"time": later, "run_id": RUN, "task_id": "t1", "attempt": 1, "worker_id": "w1"}
    cluster.publish(ev.TaskStarted(id="started-t1-1", **a))
    cluster.publish(ev.ResultReported(id="result-t1-1", **a, outcome="passed"))
    assert cluster.fold.tasks["t1"] == task, "the old attempt can produce no outcome"
    [again] = schedule.decide(cluster.fold, later, "coord")
    assert isinstance(again, ev.TaskAssigned) and again.attempt == 2


def test_a_worker_that_never_starts_its_work_is_quarantined_as_for_lost_attempts_and_a_healthy_one_is_not():
    cluster, _ = assigned_never_started()
    now = T0
    for attempt in (1, 2, 3):
        now += schedule.Policy().start_deadline + timedelta(seconds=1)
        heartbeat(cluster, now)
        decisions = list(schedule.decide(cluster.fold, now, "coord"))
        assert [d.id for d in unstarted(decisions)] == [f"unstarted-t1-{attempt}"]
        for d in decisions:
            cluster.publish(d)
        if attempt < 3:
            [reassigned] = schedule.decide(cluster.fold, now, "coord")
            cluster.publish(reassigned)
    assert cluster.fold.tasks["t1"].status == "error", "lost three times, as with a worker that dies"
    assert [type(d) for d in schedule.decide(cluster.fold, now, "coord")] == [ev.WorkerQuarantined]
    healthy, _ = assigned_never_started()
    healthy.publish(ev.TaskStarted(id="started-t1-1", time=T0, run_id=RUN, task_id="t1", attempt=1, worker_id="w1"))
    heartbeat(healthy, NOW)
    assert not unstarted(schedule.decide(healthy.fold, NOW, "coord"))
    assert healthy.fold.workers["w1"].infra_failures == 0
