"""Admission, as the fold applies it (pure, no server): submissions over the size limit, into another
submitter's run or under a task id already taken are refused with their reasons and rejected on
the record, whatever else the log holds; the same event stored twice is harmless; every decision
the scheduler makes fits in one NATS message however large the user data it copies; and times
without an offset never reach a fold."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import duckdb
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf import events as ev
from dtf import schedule, subjects
from dtf.limits import MAX_SUBMISSION_BYTES, NATS_MAX_PAYLOAD, REASON_KEEP
from dtf.projections.projection import Projection
from dtf.spec import Requirements, TaskSpec
from dtf.state import Fold
from dtf.streams import bus
from dtf.streams.bus import StoredMsg
from dtf.streams.topology import EVENTS

SOME = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                       HealthCheck.data_too_large])
T0 = datetime(2025, 6, 1, 10, 0, tzinfo=UTC)


def submitted(task_id: str, run_id: str = "r1", who: str = "alice", n: int = 0, **config) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(id=f"submit-{task_id}-{n}", time=T0 + timedelta(seconds=n), run_id=run_id,
                            task_id=task_id, submitter=who,
                            spec=TaskSpec(type="command", config={"command": "true", **config}))


def fold_of(*events: ev.Event | tuple[str, bytes]) -> tuple[Fold, list[str | None]]:
    """The fold of these events (or raw (subject, bytes) pairs), and each one's refusal."""
    fold, reasons = Fold(), []
    for seq, item in enumerate(events, 1):
        subject, data = item if isinstance(item, tuple) else (subjects.subject_for(item), ev.encode(item))
        reasons.append(fold.apply(subject, seq, data).invalid_reason)
    return fold, reasons


def online_worker(fold: Fold, worker_id: str = "w1", concurrency: int = 4) -> None:
    fold.apply_event(ev.WorkerRegistered(id=f"reg-{worker_id}", time=T0, worker_id=worker_id, host="h", pid=1,
                                         concurrency=concurrency))
    fold.apply_event(ev.WorkerHeartbeat(id=f"hb-{worker_id}", time=T0 + timedelta(seconds=5), worker_id=worker_id))


# --- size ---------------------------------------------------------------------------------------------


@SOME
@given(st.integers(MAX_SUBMISSION_BYTES - 400, MAX_SUBMISSION_BYTES + 400))
def test_a_submission_is_admitted_exactly_when_it_fits_the_limit(blob):
    event = submitted("t1", blob="x" * blob)
    data = ev.encode(event)
    fold, [reason] = fold_of(event)
    if len(data) <= MAX_SUBMISSION_BYTES:
        assert reason is None and fold.tasks["t1"].status == "pending"
    else:
        assert reason == f"submission is {len(data)} bytes; the limit is {MAX_SUBMISSION_BYTES}"
        [rejected] = schedule.rejections(fold, T0)
        assert (rejected.task_id, rejected.reason) == ("t1", reason)


def test_a_spec_that_grows_when_re_encoded_is_measured_as_the_assignment_would_carry_it():
    # "1e5" is 3 bytes on the wire and 8 ("100000.0") in every TaskAssigned that copies the spec.
    numbers = b"[" + b",".join([b"1e5"] * 40_000) + b"]"
    data = ev.encode(submitted("t1")).replace(b'"command":"true"', b'"command":"true","n":' + numbers)
    assert len(data) < MAX_SUBMISSION_BYTES
    fold, [reason] = fold_of(("dtf.task.r1.t1.submitted.alice", data))
    assert reason is not None and reason.startswith("spec is ") and reason.endswith(f"the limit is {MAX_SUBMISSION_BYTES}")


def biggest_decision(fold: Fold, now: datetime) -> int:
    return max((bus.message_size(ev.encode(d), bus.headers_for(d, expected_seq=1 << 62))
                for d in schedule.decide(fold, now, "c" * 80)), default=0)


@SOME
@given(garbage=st.sampled_from([b"\x01", b"\xff", b'"', "é".encode()]), size=st.integers(1, 1_000_000),
       reason_size=st.integers(0, 1_048_000), tags=st.integers(0, 3000))
def test_no_decision_outgrows_one_nats_message_whatever_the_user_data(garbage, size, reason_size, tags):
    """Garbage up to 1 MB of characters that JSON escapes six-fold, a worker leaving with a reason
    as big as the stream stores while it holds an attempt, and a spec at the limit asking for tags
    no worker has."""
    fold = Fold()
    online_worker(fold, "w1", concurrency=1)
    fold.apply("dtf.task.r1.junk.submitted.alice", 1, garbage * (size // len(garbage)))
    def at_limit(room: int) -> ev.TaskSubmitted:
        event = submitted("t-big", blob="y" * room)
        return msgspec.structs.replace(event, spec=msgspec.structs.replace(
            event.spec, requirements=Requirements(tags={f"k{i}": "v" * 30 for i in range(tags)})))

    big = at_limit(MAX_SUBMISSION_BYTES - len(ev.encode(at_limit(0))))
    held = submitted("t-held", n=1)
    for seq, event in enumerate([big, held], 2):
        assert fold.apply(subjects.subject_for(event), seq, ev.encode(event)).invalid_reason is None
    fold.apply_event(ev.TaskAssigned(id="a", time=T0, run_id="r1", task_id="t-held", attempt=1, worker_id="w1",
                                     coordinator="c", spec=held.spec))
    fold.apply_event(ev.WorkerLeft(id="left", time=T0, worker_id="w1", reason="z" * reason_size))
    online_worker(fold, "w2")  # can run t-big only without its tags: unschedulable, reason naming them
    decisions = list(schedule.decide(fold, T0 + timedelta(seconds=6), "c" * 80))
    assert {type(d).__name__ for d in decisions} >= {"TaskRejected", "TaskFailed"}
    assert all(len(getattr(d, "reason", "")) <= REASON_KEEP + 40 for d in decisions)  # clipped, with a note
    assert biggest_decision(fold, T0 + timedelta(seconds=6)) <= NATS_MAX_PAYLOAD


def test_an_assignment_of_a_spec_at_the_limit_fits_with_room_to_spare():
    fold = Fold()
    online_worker(fold)
    event = submitted("t1", blob="x" * (MAX_SUBMISSION_BYTES - 300))
    assert fold.apply(subjects.subject_for(event), 1, ev.encode(event)).invalid_reason is None
    [assignment] = schedule.decide(fold, T0 + timedelta(seconds=6), "c" * 80)
    assert isinstance(assignment, ev.TaskAssigned)
    assert biggest_decision(fold, T0 + timedelta(seconds=6)) < NATS_MAX_PAYLOAD // 2


# --- ownership and task ids ----------------------------------------------------------------------------

submissions = st.lists(st.tuples(st.sampled_from(["ra", "rb"]), st.sampled_from(["t1", "t2", "t3", "t4"]),
                                 st.sampled_from(["alice", "bob"]), st.integers(0, 3)), max_size=12)


@SOME
@given(submissions)
def test_a_run_holds_only_its_first_submitters_tasks_and_a_task_id_is_submitted_once(items):
    events = [submitted(task, run, who, n) for run, task, who, n in items]
    fold, reasons = fold_of(*events)
    first_of_run: dict[str, str] = {}
    first_of_task: dict[str, ev.TaskSubmitted] = {}
    for event, reason in zip(events, reasons):
        owner = first_of_run.get(event.run_id)
        known = first_of_task.get(event.task_id)
        if owner is not None and owner != event.submitter:
            assert reason == f"run {event.run_id} belongs to submitter {owner}"
        elif known is not None and known.run_id != event.run_id:
            assert reason == f"task id {event.task_id} is already used by run {known.run_id}"
        elif known is not None and known != event:
            assert reason.startswith(f"task id {event.task_id} is already submitted in run {known.run_id}")
        else:
            assert reason is None  # new, or this very event stored again: harmless
            first_of_run.setdefault(event.run_id, event.submitter)
            first_of_task.setdefault(event.task_id, event)
    assert fold.owners == first_of_run
    for task_id, first in first_of_task.items():
        task = fold.tasks[task_id]
        assert (task.run_id, task.submitter, task.submission, task.spec) == (
            first.run_id, first.submitter, first.id, first.spec)
    assert {r.source_seq for r in schedule.rejections(fold, T0)} == {
        seq for seq, reason in enumerate(reasons, 1) if reason is not None}


@SOME
@given(submissions)
def test_a_projector_restarted_from_its_tables_knows_every_runs_owner(items):
    events = [submitted(task, run, who, n) for run, task, who, n in items]
    live, _ = fold_of(*events)
    con = duckdb.connect(":memory:")
    Projection(con).apply_batch([StoredMsg(EVENTS, seq, subjects.subject_for(e), ev.encode(e))
                                 for seq, e in enumerate(events, 1)])
    assert Projection(con).fold.owners == live.owners


@SOME
@given(submissions, st.lists(st.tuples(st.sampled_from(["ra", "rb"]), st.sampled_from(["g1", "g2"]),
                                       st.sampled_from(["alice", "bob", "mallory"])), max_size=4), st.randoms())
def test_no_one_can_fail_anothers_run_with_garbage_or_foreign_tasks(items, garbage, random):
    """Whatever is submitted or thrown at a run's subjects, and rejected on the record in between,
    every task a run ends up with is its owner's."""
    messages = [(subjects.subject_for(e), ev.encode(e)) for e in (submitted(t, r, w, n) for r, t, w, n in items)]
    messages += [(subjects.task(run, task, "submitted", who), b"{garbage") for run, task, who in garbage]
    random.shuffle(messages)
    fold = Fold()
    for seq, (subject, data) in enumerate(messages, 1):
        fold.apply(subject, seq, data)
        if random.random() < 0.3:  # the coordinator rejects what is set aside so far
            for rejection in schedule.rejections(fold, T0):
                fold.apply_event(rejection)
    for rejection in schedule.rejections(fold, T0):
        fold.apply_event(rejection)
    for task in fold.tasks.values():
        assert task.submitter == fold.owners[task.run_id], task


def test_the_same_submission_stored_again_changes_nothing_and_another_under_its_id_is_refused():
    first = submitted("t1", n=0)
    other = msgspec.structs.replace(submitted("t1", n=0, extra="x"), id="submit-t1-other")
    fold, reasons = fold_of(first, first, other)
    assert reasons[:2] == [None, None] and reasons[2].startswith("task id t1 is already submitted in run r1")
    assert fold.tasks["t1"].spec == first.spec and fold.ignored == 1 and sorted(fold.invalid) == [3]


# --- times ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("event, field", [
    (submitted("t1"), "time"),
    (ev.WorkerQuarantined(id="q", time=T0, worker_id="w1", until=T0), "until"),
    (ev.WorkerLost(id="l", time=T0, worker_id="w1", last_seen=T0), "last_seen"),
    (ev.TaskDeadlineMissed(id="d", time=T0, run_id="r1", task_id="t1", deadline=T0), "deadline"),
])
@pytest.mark.parametrize("value", ["2025-06-01T10:00:00", "9999-12-31T23:59:59-23:59", "0001-01-01T00:00:00+23:59"])
def test_a_time_without_an_offset_or_outside_utc_is_refused_at_decoding(event, field, value):
    raw = msgspec.json.decode(ev.encode(event))
    raw[field] = value
    data = msgspec.json.encode(raw)
    with pytest.raises(ev.DecodeError):
        ev.decode(data)
    fold = Fold()
    online_worker(fold)
    applied = fold.apply(subjects.subject_for(event), 1, data)
    assert applied.event is None and applied.invalid_reason
    list(schedule.decide(fold, T0 + timedelta(seconds=6), "c"))  # nothing to compare it with: no crash
