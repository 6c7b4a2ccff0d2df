"""Whose fault an error is, as pure decisions: an error of the task's own making (a collection error,
bad pytest arguments) settles the task at once and says nothing against the worker; an
infrastructure error is retried and counts towards quarantine, as results from before the category
existed still do. Folded and decided without a server."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
from hypothesis import given
from hypothesis import strategies as st

from dtf import events as ev
from dtf import schedule
from dtf.projections.projection import Projection
from dtf.spec import RetryPolicy, TaskSpec
from dtf.state import TaskState, WorkerState, evolve_task, note_outcome
from dtf.streams.bus import StoredMsg
from dtf.streams.topology import EVENTS
from decision_log import DecisionLog

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = schedule.Policy(heartbeat_timeout=timedelta(seconds=15), quarantine_after=3,
                         quarantine_base=timedelta(seconds=30))
COLLECTION_ERROR = "tests/test_broken.py: collection error: SyntaxError: invalid syntax"


def result(task_id: str, attempt: int, outcome: str, category: str | None = None, reason: str = "",
           worker_id: str = "w1") -> ev.ResultReported:
    return ev.ResultReported(id=f"r-{task_id}-{attempt}", time=T0, run_id="r", task_id=task_id, attempt=attempt,
                             worker_id=worker_id, outcome=outcome, category=category, reason=reason)


def running(retries: int) -> TaskState:
    spec = TaskSpec(type="test", config={"paths": ["tests/test_broken.py"]},
                    retry_policy=RetryPolicy(max_retries=retries))
    return TaskState(run_id="r", task_id="t1", spec=spec, status="running", attempt=1, worker_id="w1",
                     submitted_at=T0, assigned_at=T0)


@given(retries=st.integers(0, 5))
def test_an_error_of_the_tasks_own_making_settles_it_at_once_with_its_reason(retries):
    settled = evolve_task(running(retries), result("t1", 1, "error", "task", COLLECTION_ERROR))
    assert (settled.status, settled.failures, settled.reason) == ("error", 0, COLLECTION_ERROR)


@given(retries=st.integers(1, 5), category=st.sampled_from([None, "worker", "unknown"]))
def test_an_infrastructure_error_is_retried_with_its_reason(retries, category):
    requeued = evolve_task(running(retries), result("t1", 1, "error", category, "pytest hit an internal error"))
    assert (requeued.status, requeued.failures, requeued.reason) == ("pending", 1, "pytest hit an internal error")


def test_a_result_from_before_the_category_existed_is_still_an_infrastructure_error():
    old = msgspec.json.encode({"type": "ResultReported", "id": "r1", "time": T0.isoformat(), "v": 1, "run_id": "r",
                               "task_id": "t1", "attempt": 1, "worker_id": "w1", "outcome": "error"})
    event = ev.decode(old)
    assert isinstance(event, ev.ResultReported) and (event.category, event.reason) == (None, "")
    assert note_outcome(WorkerState(worker_id="w1", status="online"), event).infra_failures == 1
    assert evolve_task(running(1), event).status == "pending"


ENDINGS = {
    "passed": lambda n: result(f"t{n}", 1, "passed"),
    "failed": lambda n: result(f"t{n}", 1, "failed"),
    "task error": lambda n: result(f"t{n}", 1, "error", "task", COLLECTION_ERROR),
    "infrastructure error": lambda n: result(f"t{n}", 1, "error", "unknown"),
    "old error": lambda n: result(f"t{n}", 1, "error"),
    "timed out": lambda n: result(f"t{n}", 1, "timed_out"),
    "resource failure": lambda n: ev.TaskFailed(id=f"f{n}", time=T0, run_id="r", task_id=f"t{n}", attempt=1,
                                                worker_id="w1", category="resource", reason="disk full"),
    "data failure": lambda n: ev.TaskFailed(id=f"f{n}", time=T0, run_id="r", task_id=f"t{n}", attempt=1,
                                            worker_id="w1", category="data", reason="workspace gone"),
}
INFRA = {"infrastructure error", "old error", "resource failure"}
REAL = {"passed", "failed", "task error"}


@given(st.lists(st.sampled_from(sorted(ENDINGS))))
def test_a_workers_infrastructure_count_is_its_infrastructure_endings_since_its_last_real_result(endings):
    worker = WorkerState(worker_id="w1", status="online")
    for n, ending in enumerate(endings):
        worker = note_outcome(worker, ENDINGS[ending](n))
    since_real = endings[max((i for i, e in enumerate(endings) if e in REAL), default=-1) + 1:]
    assert worker.infra_failures == sum(e in INFRA for e in since_real)


def submitted(task_id: str, retries: int = 2) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(id=f"s-{task_id}", time=T0, run_id="r", task_id=task_id, submitter="a",
                            spec=TaskSpec(type="test", config={"paths": ["tests/test_broken.py"]},
                                          retry_policy=RetryPolicy(max_retries=retries)))


def test_test_files_that_do_not_import_never_quarantine_a_healthy_worker():
    log = DecisionLog(POLICY)
    log.add(ev.WorkerRegistered(id="reg", time=T0, worker_id="w1", host="h", pid=1, concurrency=1),
            ev.WorkerHeartbeat(id="hb", time=T0, worker_id="w1"), *(submitted(f"t{i}") for i in range(5)))
    for _ in range(5):
        [assigned] = [e for e in log.settle(T0) if isinstance(e, ev.TaskAssigned)]
        assert assigned.attempt == 1  # never a retry of an earlier one
        log.add(result(assigned.task_id, 1, "error", "task", COLLECTION_ERROR))
    assert log.settle(T0) == []
    assert {t.status for t in log.fold.tasks.values()} == {"error"}
    assert (log.fold.workers["w1"].status, log.fold.workers["w1"].infra_failures) == ("online", 0)


def test_a_probe_that_finds_a_broken_test_file_ends_the_quarantine():
    log = DecisionLog(POLICY)
    log.add(ev.WorkerRegistered(id="reg", time=T0, worker_id="w1", host="h", pid=1, concurrency=1),
            *(submitted(f"t{i}", retries=0) for i in range(4)))
    for _ in range(3):
        log.add(ev.WorkerHeartbeat(id="hb", time=T0, worker_id="w1"))
        [assigned] = [e for e in log.settle(T0) if isinstance(e, ev.TaskAssigned)]
        log.add(result(assigned.task_id, 1, "error", "unknown", "pytest hit an internal error"))
    [quarantined] = log.settle(T0)
    assert isinstance(quarantined, ev.WorkerQuarantined)
    later = T0 + timedelta(seconds=31)
    log.add(ev.WorkerHeartbeat(id="hb-later", time=later, worker_id="w1"))
    [probe] = log.settle(later)
    log.add(result(probe.task_id, probe.attempt, "error", "task", COLLECTION_ERROR))
    assert log.fold.workers["w1"].status == "online"


def test_the_read_models_attempt_row_says_whose_fault_an_error_was_and_why():
    log = DecisionLog(POLICY)
    log.add(ev.WorkerRegistered(id="reg", time=T0, worker_id="w1", host="h", pid=1, concurrency=1),
            ev.WorkerHeartbeat(id="hb", time=T0, worker_id="w1"), submitted("t1"), submitted("t2"))
    for reported in (lambda a: result(a.task_id, 1, "error", "task", COLLECTION_ERROR),
                     lambda a: result(a.task_id, 1, "passed", reason="no tests selected: pytest collected none")):
        [assigned] = [e for e in log.settle(T0) if isinstance(e, ev.TaskAssigned)]
        log.add(reported(assigned))
    projection = Projection.open(":memory:")
    try:
        projection.apply_batch([StoredMsg(EVENTS, seq, subject, data) for subject, seq, data in log.messages])
        attempts = projection.con.execute("SELECT task_id, status, reason FROM attempts ORDER BY ALL").fetchall()
    finally:
        projection.close()
    assert attempts == [("t1", "error", f"task: {COLLECTION_ERROR}"),
                        ("t2", "passed", "no tests selected: pytest collected none")]
