"""Worker health as pure decisions: lost workers, quarantine with a probe, and draining — folded and
decided without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from dtf import events as ev
from dtf import schedule
from dtf.spec import TaskSpec
from decision_log import DecisionLog

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = schedule.Policy(heartbeat_timeout=timedelta(seconds=15), quarantine_after=3,
                         quarantine_base=timedelta(seconds=30))


def Log() -> DecisionLog:  # noqa: N802 - reads as the log it returns
    return DecisionLog(POLICY)


def submitted(task_id: str) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(id=f"s-{task_id}", time=T0, run_id="r", task_id=task_id, submitter="a",
                            spec=TaskSpec(type="command", config={"command": "true"}))


def registered(worker_id: str, concurrency: int = 1) -> ev.WorkerRegistered:
    return ev.WorkerRegistered(id=f"reg-{worker_id}", time=T0, worker_id=worker_id, host="h", pid=1,
                               concurrency=concurrency)


def beat(worker_id: str, at: datetime) -> ev.WorkerHeartbeat:
    return ev.WorkerHeartbeat(id=f"hb-{worker_id}-{at.timestamp()}", time=at, worker_id=worker_id)


def infra_failure(task_id: str, attempt: int, worker_id: str, at: datetime) -> ev.TaskFailed:
    return ev.TaskFailed(id=f"f-{task_id}-{attempt}", time=at, run_id="r", task_id=task_id, attempt=attempt,
                         worker_id=worker_id, category="resource", reason="disk full")


def test_a_worker_silent_past_the_timeout_is_lost_and_its_attempt_requeued_without_using_a_retry():
    log = Log()
    log.add(registered("w1"), beat("w1", T0), submitted("t1"))
    [assigned] = log.settle(T0)
    assert assigned.worker_id == "w1"
    assert log.decide(T0 + timedelta(seconds=15)) == []  # not yet: exactly at the timeout
    lost = log.settle(T0 + timedelta(seconds=16))
    assert [type(e).__name__ for e in lost] == ["WorkerLost", "TaskFailed"]
    task = log.fold.tasks["t1"]
    assert (task.status, task.failures, task.lost) == ("pending", 0, 1)


def test_three_infrastructure_failures_in_a_row_quarantine_a_worker_and_a_probe_ends_it():
    log = Log()
    log.add(registered("w1"), submitted("t1"), submitted("t2"), submitted("t3"), submitted("t4"))
    now = T0
    for attempt_of in ("t1", "t2", "t3"):
        log.add(beat("w1", now))
        [assigned] = [e for e in log.settle(now) if isinstance(e, ev.TaskAssigned)]
        assert assigned.task_id == attempt_of
        log.add(infra_failure(assigned.task_id, 1, "w1", now))
        now += timedelta(seconds=1)
    log.add(beat("w1", now))
    decisions = log.settle(now)
    assert [type(e).__name__ for e in decisions] == ["WorkerQuarantined"]
    worker = log.fold.workers["w1"]
    assert worker.status == "quarantined" and worker.quarantined_until == now + timedelta(seconds=30)
    assert "3 infrastructure failures in a row" in worker.reason

    later = now + timedelta(seconds=31)
    log.add(beat("w1", later))
    [probe] = log.settle(later)  # one probe attempt only, though four tasks wait
    assert isinstance(probe, ev.TaskAssigned)
    log.add(ev.ResultReported(id="ok", time=later, run_id="r", task_id=probe.task_id, attempt=probe.attempt,
                              worker_id="w1", outcome="passed"))
    assert log.fold.workers["w1"].status == "online" and log.fold.workers["w1"].infra_failures == 0


def test_a_failed_probe_quarantines_the_worker_again_for_twice_as_long():
    log = Log()
    log.add(registered("w1"), *(submitted(f"t{i}") for i in range(5)))
    now = T0
    for _ in range(3):
        log.add(beat("w1", now))
        [assigned] = [e for e in log.settle(now) if isinstance(e, ev.TaskAssigned)]
        log.add(infra_failure(assigned.task_id, assigned.attempt, "w1", now))
    log.settle(now)
    probe_time = now + timedelta(seconds=31)
    log.add(beat("w1", probe_time))
    [probe] = log.settle(probe_time)
    log.add(infra_failure(probe.task_id, probe.attempt, "w1", probe_time))
    [again] = log.settle(probe_time)
    assert isinstance(again, ev.WorkerQuarantined)
    assert again.until == probe_time + timedelta(seconds=60) and "probe failed" in again.reason


def test_failing_tests_are_not_the_workers_fault():
    log = Log()
    log.add(registered("w1"), *(submitted(f"t{i}") for i in range(4)))
    for i in range(4):
        log.add(beat("w1", T0))
        [assigned] = [e for e in log.settle(T0) if isinstance(e, ev.TaskAssigned)]
        log.add(ev.ResultReported(id=f"r{i}", time=T0, run_id="r", task_id=assigned.task_id, attempt=1,
                                  worker_id="w1", outcome="failed"))
    assert log.fold.workers["w1"].status == "online" and log.fold.workers["w1"].infra_failures == 0


def test_a_draining_worker_gets_no_new_work_but_keeps_what_it_runs():
    log = Log()
    log.add(registered("w1", concurrency=2), beat("w1", T0), submitted("t1"))
    [first] = log.settle(T0)
    log.add(ev.WorkerDrainRequested(id="d", time=T0, worker_id="w1", by="ops"), submitted("t2"))
    assert log.settle(T0) == []
    assert log.fold.tasks["t1"].status == "assigned" and log.fold.tasks["t1"].worker_id == first.worker_id
    log.add(registered("w1", concurrency=2))  # same registration again: still draining
    assert log.fold.workers["w1"].draining
