"""The fold: raw stream messages in, task and worker state out. Driven with generated histories of a
few tasks on a few workers (plausible lifecycles, then interleaved, shuffled, duplicated and salted with
garbage), it must never raise, settle each attempt at most once, ignore late and foreign results, keep
its `active` index true, shrug off duplicate deliveries, and set garbage submissions aside until the
coordinator's TaskRejected takes them off the list."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf import events as ev
from dtf import schedule, subjects
from dtf.spec import RetryPolicy, TaskSpec
from dtf.state import ACTIVE, TERMINAL, Fold, TaskState, backoff_delay, evolve_task

HISTORIES = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SOME = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RUN = "r1"
TASKS = ("t1", "t2", "t3")
WORKERS = ("w1", "w2")
T0 = datetime(2025, 6, 1, 10, 0, tzinfo=UTC)

Message = tuple[str, bytes]


def msg(event: ev.Event) -> Message:
    return subjects.subject_for(event), ev.encode(event)


# --- generated histories -------------------------------------------------------------------------------

retry_policies = st.builds(
    RetryPolicy,
    max_retries=st.integers(0, 3),
    retry_delay_seconds=st.sampled_from([0.0, 0.5, 10.0]) | st.floats(0, 1e13),
    max_delay_seconds=st.sampled_from([0.0, 60.0]) | st.floats(0, 1e13),
    jitter=st.booleans(),
)
# Mostly a clock that moves forward by seconds; now and then a worker with a clock far off.
skewed_times = st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(9999, 12, 31, 23, 59),
                            timezones=st.just(UTC))


@st.composite
def lifecycle(draw, task_id: str) -> list[Message]:
    """One task's plausible history: submitted, then attempts that start, end or are handed back."""
    clock = [T0 + timedelta(seconds=draw(st.integers(0, 30)))]

    def at() -> datetime:
        if draw(st.integers(0, 15)) == 0:
            return draw(skewed_times)
        clock[0] += timedelta(seconds=draw(st.integers(1, 120)))
        return clock[0]

    spec = TaskSpec(type="command", config={"command": f"run {task_id}"}, retry_policy=draw(retry_policies))
    out = [msg(ev.TaskSubmitted(id=f"submit-{task_id}", time=at(), run_id=RUN, task_id=task_id,
                                submitter="alice", spec=spec))]
    ids = {"run_id": RUN, "task_id": task_id}
    for attempt in range(1, draw(st.integers(0, 4)) + 1):
        worker = draw(st.sampled_from(WORKERS))
        a = dict(ids, attempt=attempt, worker_id=worker)
        out.append(msg(ev.TaskAssigned(id=f"assign-{task_id}-{attempt}", time=at(), **a, coordinator="c",
                                       spec=spec)))
        if draw(st.booleans()):
            out.append(msg(ev.TaskStarted(id=f"start-{task_id}-{attempt}", time=at(), **a)))
        end = draw(st.sampled_from(["result", "result", "failed", "released", "open"]))
        if end == "result":
            out.append(msg(ev.ResultReported(
                id=f"result-{task_id}-{attempt}", time=at(), **a,
                outcome=draw(st.sampled_from(["passed", "failed", "error", "timed_out", "cancelled"])),
                counts=ev.TestCounts(passed=draw(st.integers(0, 3))),
            )))
        elif end == "failed":
            out.append(msg(ev.TaskFailed(id=f"fail-{task_id}-{attempt}", time=at(), **a,
                                         category=draw(st.sampled_from(["worker", "resource", "network"])),
                                         reason="lost")))
        elif end == "released":
            out.append(msg(ev.TaskReleased(id=f"release-{task_id}-{attempt}", time=at(), **a,
                                           reason="draining")))
        else:
            break
    if draw(st.integers(0, 5)) == 0:
        out.append(msg(ev.TaskCancelled(id=f"cancel-{task_id}", time=at(), **ids, reason="user", by="alice")))
    return out


@st.composite
def worker_history(draw, worker_id: str) -> list[Message]:
    out = [msg(ev.WorkerRegistered(
        id=f"register-{worker_id}", time=T0, worker_id=worker_id, host="h", pid=1,
        concurrency=draw(st.integers(0, 3)),
    ))]
    for i in range(draw(st.integers(0, 2))):
        out.append(msg(ev.WorkerHeartbeat(id=f"hb-{worker_id}-{i}", time=T0 + timedelta(seconds=30 * i),
                                          worker_id=worker_id)))
    if draw(st.integers(0, 4)) == 0:
        out.append(msg(ev.WorkerLeft(id=f"left-{worker_id}", time=T0 + timedelta(hours=1),
                                     worker_id=worker_id)))
    return out


@st.composite
def garbage(draw) -> Message:
    """What a buggy or hostile client might put on the bus."""
    task_id = draw(st.sampled_from([*TASKS, "t9"]))
    kind = draw(st.integers(0, 6))
    if kind == 0:  # bytes that are not an event, on a submission subject
        return subjects.task(RUN, task_id, "submitted", "mallory"), draw(st.binary(max_size=40))
    if kind == 1:  # a submission whose spec cannot run
        bad = ev.TaskSubmitted(id=f"bad-{task_id}", time=T0, run_id=RUN, task_id=task_id, submitter="mallory",
                               spec=TaskSpec(type="test", config={}))
        return msg(bad)
    if kind == 2:  # a second submission of a task id under another run
        other = ev.TaskSubmitted(id=f"other-{task_id}", time=T0, run_id="r2", task_id=task_id,
                                 submitter="mallory", spec=TaskSpec(type="command", config={"command": "x"}))
        return msg(other)
    if kind == 3:  # a result forged on another worker's subject
        forged = ev.ResultReported(id="forged", time=T0, run_id=RUN, task_id=task_id, attempt=1,
                                   worker_id="w1", outcome="passed")
        return subjects.task(RUN, task_id, "result", "w2"), ev.encode(forged)
    if kind == 4:  # bytes on a result subject
        return subjects.task(RUN, task_id, "result", "w1"), draw(st.binary(max_size=40))
    if kind == 5:  # a malformed task subject
        return f"dtf.task.{RUN}.{task_id}", draw(st.binary(max_size=40))
    # a valid event with a few bytes overwritten
    base = ev.encode(ev.TaskStarted(id="s", time=T0, run_id=RUN, task_id=task_id, attempt=1, worker_id="w1"))
    pos = draw(st.integers(0, len(base) - 1))
    return subjects.task(RUN, task_id, "submitted", "mallory"), base[:pos] + draw(st.binary(max_size=3))


def interleave(draw, queues: list[list[Message]]) -> list[Message]:
    """Merge per-aggregate histories in some order that keeps each one's own order."""
    queues = [list(q) for q in queues if q]
    out: list[Message] = []
    while queues:
        i = draw(st.integers(0, len(queues) - 1))
        out.append(queues[i].pop(0))
        if not queues[i]:
            queues.pop(i)
    return out


@st.composite
def histories(draw, mess: bool = True) -> list[Message]:
    """Plausible lifecycles interleaved; with `mess`, then partly shuffled, duplicated, salted."""
    workers = [draw(worker_history(w)) for w in WORKERS]
    tasks = [draw(lifecycle(t)) for t in TASKS[: draw(st.integers(1, len(TASKS)))]]
    out = [*[m for w in workers for m in w[:1]], *interleave(draw, [w[1:] for w in workers] + tasks)]
    if not mess:
        return out
    for _ in range(draw(st.integers(0, 3))):  # late and early deliveries
        i, j = draw(st.integers(0, len(out) - 1)), draw(st.integers(0, len(out) - 1))
        out.insert(j, out.pop(i))
    for _ in range(draw(st.integers(0, 3))):  # an event published again after the dedup window
        out.insert(draw(st.integers(0, len(out))), out[draw(st.integers(0, len(out) - 1))])
    for _ in range(draw(st.integers(0, 3))):
        out.insert(draw(st.integers(0, len(out))), draw(garbage()))
    return out


# --- observing the fold --------------------------------------------------------------------------------


def derived_active(fold: Fold) -> dict[str, set[str]]:
    active: dict[str, set[str]] = {}
    for task in fold.tasks.values():
        if task.status in ACTIVE:
            active.setdefault(task.worker_id, set()).add(task.task_id)
    return active


def indexed_active(fold: Fold) -> dict[str, set[str]]:
    return {worker: set(ids) for worker, ids in fold.active.items() if ids}


def snapshot(fold: Fold):
    """Everything the fold knows except the `ignored` counter."""
    return (dict(fold.tasks), dict(fold.workers), indexed_active(fold), dict(fold.invalid),
            dict(fold.task_seq), fold.last_seq)


class Observer:
    """Applies messages one by one and checks the invariants after each."""

    def __init__(self) -> None:
        self.fold = Fold()
        self.seq = 0
        self.ended: set[tuple[str, int]] = set()
        self.settled: set[str] = set()

    def apply(self, message: Message) -> ev.Event | None:
        subject, data = message
        self.seq += 1
        before = dict(self.fold.tasks)
        workers_before = dict(self.fold.workers)
        applied = self.fold.apply(subject, self.seq, data)
        self.check(before, workers_before, subject, applied)
        return applied.event

    def check(self, before: dict[str, TaskState], workers_before, subject: str, applied) -> None:
        fold, event = self.fold, applied.event
        assert indexed_active(fold) == derived_active(fold)
        changed = {tid for tid in fold.tasks.keys() | before.keys() if fold.tasks.get(tid) != before.get(tid)}
        if event is None:
            assert not changed and fold.workers == workers_before, "a set-aside message changes nothing"
            kind = subjects.parse(subject).kind
            if subject.startswith("dtf.task.") and kind in ("submitted", ""):
                assert self.seq in fold.invalid
            return
        if isinstance(event, ev.TaskRejected):
            assert event.source_seq not in fold.invalid
        assert changed <= ({event.task_id} if isinstance(event, ev.TaskEvent) else set())
        for tid in changed:
            old, new = before.get(tid), fold.tasks[tid]
            assert old is None or not old.terminal, "a settled task never changes again"
            if new.terminal:
                assert tid not in self.settled
                self.settled.add(tid)
            if old is not None and old.status in ACTIVE and (new.status not in ACTIVE or new.attempt != old.attempt):
                assert (tid, old.attempt) not in self.ended, "an attempt ends at most once"
                self.ended.add((tid, old.attempt))
            if old is not None:
                assert new.attempt in (old.attempt, old.attempt + 1)
            if isinstance(event, ev.AttemptEvent) and not isinstance(event, ev.TaskAssigned):
                assert old is not None and old.status in ACTIVE
                assert (event.attempt, event.worker_id) == (old.attempt, old.worker_id), \
                    "only the current attempt on its assigned worker moves a task"
            if isinstance(event, ev.TaskAssigned):
                assert new.status == "assigned" and new.attempt == event.attempt == old.attempt + 1


# --- the fold under generated histories ----------------------------------------------------------------


@HISTORIES
@given(histories())
def test_a_messy_history_never_breaks_the_folds_invariants(history):
    observer = Observer()
    for message in history:
        observer.apply(message)


@HISTORIES
@given(histories(mess=False))
def test_a_plausible_history_settles_each_attempt_at_most_once_and_keeps_attempts_counted(history):
    observer = Observer()
    for message in history:
        observer.apply(message)
    for task in observer.fold.tasks.values():
        assert task.attempt <= 4 and task.failures <= task.attempt
        assert (task.status in TERMINAL) == (task.finished_at is not None)


@HISTORIES
@given(histories())
def test_every_message_delivered_twice_in_a_row_leaves_the_state_of_one_delivery(history):
    once, twice = Fold(), Fold()
    for seq, (subject, data) in enumerate(history, 1):
        once.apply(subject, seq, data)
        twice.apply(subject, seq, data)
        after_first = snapshot(twice)
        twice.apply(subject, seq, data)
        assert snapshot(twice) == after_first
    assert snapshot(once) == snapshot(twice)


@HISTORIES
@given(histories(mess=False), st.data())
def test_a_task_event_published_again_later_changes_no_task(history, data):
    fold = Fold()
    effective = []
    for seq, (subject, payload) in enumerate(history, 1):
        before = dict(fold.tasks)
        applied = fold.apply(subject, seq, payload)
        if isinstance(applied.event, ev.TaskEvent) and fold.tasks != before:
            effective.append((subject, payload))
    if not effective:
        return
    tasks, active = dict(fold.tasks), indexed_active(fold)
    subject, payload = data.draw(st.sampled_from(effective))
    fold.apply(subject, len(history) + 1, payload)
    assert fold.tasks == tasks and indexed_active(fold) == active


@HISTORIES
@given(histories())
def test_replaying_the_same_messages_builds_the_same_state(history):
    first, second = Fold(), Fold()
    for seq, (subject, data) in enumerate(history, 1):
        assert first.apply(subject, seq, data) == second.apply(subject, seq, data)
    assert snapshot(first) == snapshot(second) and first.ignored == second.ignored


@HISTORIES
@given(histories())
def test_garbage_submissions_wait_in_invalid_until_their_rejection_is_folded(history):
    observer = Observer()
    for message in history:
        observer.apply(message)
    fold = observer.fold
    waiting = set(fold.invalid)
    rejections = schedule.rejections(fold, T0)
    assert {r.source_seq for r in rejections} == waiting
    tasks_before = dict(fold.tasks)
    for rejection in rejections:
        assert observer.apply(msg(rejection)) == rejection, "the coordinator's verdict is accepted"
    assert fold.invalid == {}
    for task_id, task in tasks_before.items():
        assert fold.tasks[task_id] == task, "a rejection never touches a task that was accepted"


# --- targeted cases -------------------------------------------------------------------------------------


def submitted(task_id="t1", retries=0, **policy) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(
        id=f"submit-{task_id}", time=T0, run_id=RUN, task_id=task_id, submitter="alice",
        spec=TaskSpec(type="command", config={"command": "x"},
                      retry_policy=RetryPolicy(max_retries=retries, **policy)),
    )


def attempt(cls, n: int, worker: str, task_id="t1", at=T0, **fields):
    return cls(id=f"{cls.__name__}-{task_id}-{n}-{worker}", time=at, run_id=RUN, task_id=task_id, attempt=n,
               worker_id=worker, **fields)


def folded(*events: ev.Event) -> Fold:
    fold = Fold()
    for seq, event in enumerate(events, 1):
        subject, data = msg(event)
        assert fold.apply(subject, seq, data).event is not None, event
    return fold


@SOME
@given(st.integers(1, 3), st.sampled_from(WORKERS + ("w3",)), st.integers(1, 4),
       st.sampled_from(["passed", "failed", "error", "timed_out", "cancelled"]), st.booleans())
def test_a_late_result_for_another_attempt_or_from_another_worker_changes_nothing(
    current, worker, late_attempt, outcome, started
):
    history = [submitted(retries=5)]
    for n in range(1, current + 1):
        history.append(attempt(ev.TaskAssigned, n, "w1", coordinator="c", spec=history[0].spec))
        if n < current:
            history.append(attempt(ev.TaskReleased, n, "w1", reason="draining"))
    if started:
        history.append(attempt(ev.TaskStarted, current, "w1"))
    fold = folded(*history)
    if (late_attempt, worker) == (current, "w1"):
        return
    before = snapshot(fold)
    late = attempt(ev.ResultReported, late_attempt, worker, outcome=outcome)
    fold.apply(subjects.subject_for(late), len(history) + 1, ev.encode(late))
    assert snapshot(fold)[:3] == before[:3]


def test_a_result_for_a_released_attempt_is_ignored_after_the_task_is_requeued():
    fold = folded(
        submitted(),
        attempt(ev.TaskAssigned, 1, "w1", coordinator="c", spec=submitted().spec),
        attempt(ev.TaskReleased, 1, "w1", reason="draining"),
        attempt(ev.ResultReported, 1, "w1", outcome="passed"),
    )
    task = fold.tasks["t1"]
    assert task.status == "pending" and task.attempt == 1 and fold.ignored == 1


def test_a_retryable_failure_requeues_with_a_backoff_and_the_last_one_settles():
    spec = submitted(retries=1, retry_delay_seconds=10, jitter=False).spec
    fold = folded(
        submitted(retries=1, retry_delay_seconds=10, jitter=False),
        attempt(ev.TaskAssigned, 1, "w1", coordinator="c", spec=spec),
        attempt(ev.TaskFailed, 1, "w1", at=T0 + timedelta(seconds=5), reason="lost"),
    )
    task = fold.tasks["t1"]
    assert (task.status, task.failures, task.not_before) == ("pending", 1, T0 + timedelta(seconds=15))
    for seq, event in enumerate([
        attempt(ev.TaskAssigned, 2, "w2", at=T0 + timedelta(seconds=20), coordinator="c", spec=spec),
        attempt(ev.ResultReported, 2, "w2", at=T0 + timedelta(seconds=30), outcome="timed_out"),
    ], 10):
        fold.apply(subjects.subject_for(event), seq, ev.encode(event))
    task = fold.tasks["t1"]
    assert (task.status, task.attempt, task.failures, task.finished_at) == (
        "timed_out", 2, 2, T0 + timedelta(seconds=30))


@pytest.mark.parametrize("delay, failed_at", [
    (1e12, T0),                                   # a retry policy measured in millennia
    (10.0, datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),  # a worker whose clock is at the end of time
])
def test_a_backoff_past_the_end_of_time_does_not_crash_the_fold(delay, failed_at):
    spec_event = submitted(retries=3, retry_delay_seconds=delay, max_delay_seconds=delay, jitter=False)
    fold = folded(
        ev.WorkerRegistered(id="reg-w1", time=T0, worker_id="w1", host="h", pid=1),
        spec_event, attempt(ev.TaskAssigned, 1, "w1", coordinator="c", spec=spec_event.spec),
    )
    failure = attempt(ev.TaskFailed, 1, "w1", at=failed_at, reason="lost")
    assert fold.apply(subjects.subject_for(failure), 4, ev.encode(failure)).event == failure
    task = fold.tasks["t1"]
    assert task.status == "pending" and task.not_before is not None and task.not_before >= failed_at
    later = T0 + timedelta(days=365)
    fold.apply_event(ev.WorkerHeartbeat(id="hb", time=later, worker_id="w1"))
    fold.apply_event(submitted("control"))
    assert [a.task_id for a in schedule.assignments(fold, later, "c")] == ["control"], \
        "the worker is free, but the task waits out its (endless) backoff"


def test_a_garbage_submission_is_set_aside_and_its_rejection_takes_it_off_the_list():
    fold = Fold()
    subject = subjects.task(RUN, "t9", "submitted", "mallory")
    assert fold.apply(subject, 7, b"{not json").invalid_reason
    assert set(fold.invalid) == {7} and fold.invalid[7].raw == b"{not json"
    [rejection] = schedule.rejections(fold, T0)
    assert (rejection.run_id, rejection.task_id, rejection.source_seq) == (RUN, "t9", 7)
    assert fold.apply(subjects.subject_for(rejection), 8, ev.encode(rejection)).event == rejection
    assert fold.invalid == {} and fold.tasks["t9"].status == "rejected"


def test_garbage_on_a_worker_subject_is_only_counted():
    fold = Fold()
    fold.apply(subjects.task(RUN, "t1", "result", "w1"), 1, b"\xff")
    fold.apply(subjects.worker("w1", "registered"), 2, b"[]")
    assert fold.invalid == {} and fold.ignored == 2 and fold.tasks == {}


# --- backoff --------------------------------------------------------------------------------------------


@SOME
@given(
    st.builds(RetryPolicy, max_retries=st.integers(0, 100), retry_delay_seconds=st.floats(0, 1e6),
              max_delay_seconds=st.floats(0, 1e6), jitter=st.booleans()),
    st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True),
    st.integers(1, 101),
)
def test_backoff_stays_within_zero_and_the_capped_exponential_and_is_deterministic(policy, task_id, failures):
    delay = backoff_delay(policy, task_id, failures)
    ceiling = min(policy.max_delay_seconds, policy.retry_delay_seconds * 2 ** (failures - 1))
    assert 0 <= delay <= ceiling
    assert delay == backoff_delay(msgspec.structs.replace(policy), task_id, failures)
    if not policy.jitter:
        assert delay == ceiling


def test_backoff_jitter_differs_between_tasks_and_failures():
    policy = RetryPolicy(retry_delay_seconds=100, max_delay_seconds=1e6)
    delays = {backoff_delay(policy, f"t{i}", n) / (100 * 2 ** (n - 1)) for i in range(20) for n in (1, 2, 3)}
    assert len(delays) == 60 and all(0 <= d < 1 for d in delays)


def test_evolve_is_pure_and_ignores_events_for_unknown_tasks():
    started = attempt(ev.TaskStarted, 1, "w1")
    assert evolve_task(None, started) is None
    state = evolve_task(None, submitted())
    assert evolve_task(state, started) is state


def test_a_cancel_counts_only_from_the_tasks_submitter_or_the_coordinator():
    fold = Fold()
    spec = TaskSpec(type="command", config={"command": "true"})
    submitted = ev.TaskSubmitted(id="s1", time=T0, run_id=RUN, task_id="t1", submitter="alice", spec=spec)
    fold.apply(subjects.subject_for(submitted), 1, ev.encode(submitted))
    forged = ev.TaskCancelled(id="c1", time=T0, run_id=RUN, task_id="t1", by="mallory", reason="mine now")
    applied = fold.apply(subjects.subject_for(forged), 2, ev.encode(forged))
    assert applied.event is None and "mallory may not cancel task t1 of alice" in applied.invalid_reason
    assert fold.tasks["t1"].status == "pending"
    for seq, by in ((3, "alice"), (4, subjects.COORDINATOR)):
        fresh = Fold()
        fresh.apply(subjects.subject_for(submitted), 1, ev.encode(submitted))
        own = ev.TaskCancelled(id=f"c{seq}", time=T0, run_id=RUN, task_id="t1", by=by)
        assert fresh.apply(subjects.subject_for(own), seq, ev.encode(own)).event is not None
        assert fresh.tasks["t1"].status == "cancelled"
