"""Task and worker state machines: pure folds of events into state.

`evolve_task` and `evolve_worker` are pure: (state, event) -> new state, never touching I/O or the
clock. `Fold` is the in-memory cache of every aggregate that the coordinator, `dtf wait` and the
replay command build from the stream; its `apply` turns one raw stream message into those pure calls,
remembers each task subject's last stream sequence (the coordinator's optimistic-concurrency token)
and sets aside messages that cannot be accepted so the coordinator can reject them on the record.

Task lifecycle (attempt numbers start at 1):

    pending --TaskAssigned(n)--> assigned --TaskStarted(n)--> running --ResultReported(n)--> passed|failed|...
       ^                           |  |                          |  |
       +------ TaskReleased(n) ----+  +----- TaskFailed(n) ------+  +-- retryable and retries left --> pending
    any non-terminal --TaskCancelled--> cancelled;   unknown task --TaskRejected--> rejected
    pending --TaskUnschedulable--> unschedulable --TaskAssigned(n)--> assigned   (a capable worker came)
    TaskDeadlineMissed marks any unsettled task once and changes nothing else.
    TaskPreempted(n) marks an active attempt as being handed back; its TaskReleased(n) requeues it.
    An attempt not started by the start deadline is failed by the coordinator as lost with its worker
    (TaskFailed(n), category "worker", id `unstarted-<task>-<n>`), like one whose worker was lost.

An event for any attempt but the current one (a late result from a lost attempt, a duplicate) changes
nothing: at most one terminal outcome per attempt.
"""

from __future__ import annotations

import hashlib
from datetime import datetime, timedelta
from typing import Literal, NamedTuple

import msgspec
from sortedcontainers import SortedList

from dtf import admission, subjects
from dtf import events as ev
from dtf.spec import RetryPolicy, SpecError, TaskSpec, validate

TaskStatus = Literal[
    "pending", "unschedulable", "assigned", "running", "passed", "failed", "error", "timed_out", "cancelled", "rejected",
]
TERMINAL: frozenset[str] = frozenset({"passed", "failed", "error", "timed_out", "cancelled", "rejected"})
ACTIVE: frozenset[str] = frozenset({"assigned", "running"})
QUEUED: frozenset[str] = frozenset({"pending", "unschedulable"})
"""Waiting for a worker: an unschedulable task is assigned like a pending one once a worker fits."""
RETRYABLE_OUTCOMES: frozenset[str] = frozenset({"error", "timed_out"})
"""Tests that ran and failed are not retried by default; infrastructure trouble is (`task_error`s not)."""
INFRA_CATEGORIES: frozenset[str] = frozenset({"network", "resource", "worker", "hardware"})
"""TaskFailed categories that speak of the worker, not of the task: they count towards quarantine."""
MAX_LOST_ATTEMPTS = 3
"""Attempts lost with their worker are requeued at once and do not use up retries, but a task that
takes down its worker this many times is settled as an error rather than requeued forever."""


class TaskState(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    task_id: str
    submitter: str = ""
    project: str = ""
    spec: TaskSpec | None = None
    submission: str = ""
    """The id of the TaskSubmitted that made the task ("" if rejected, or from an older snapshot)."""
    status: TaskStatus = "pending"
    attempt: int = 0
    failures: int = 0
    lost: int = 0
    worker_id: str = ""
    submitted_at: datetime | None = None
    assigned_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    not_before: datetime | None = None
    duration_s: float | None = None
    counts: ev.TestCounts = msgspec.field(default_factory=ev.TestCounts)
    reason: str = ""
    unschedulable: int = 0
    """TaskUnschedulable events so far (the next one's id is `unschedulable-<task>-<n+1>`)."""
    deadline_missed: datetime | None = None
    """When the coordinator recorded that the task missed its spec.deadline."""
    preempted_attempt: int = 0
    """The attempt a TaskPreempted last asked back; while it is the current active attempt, its
    worker is handing it back (see `preempting`)."""

    @property
    def preempting(self) -> bool:
        return self.status in ACTIVE and self.preempted_attempt == self.attempt

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL


class WorkerState(msgspec.Struct, frozen=True, kw_only=True):
    worker_id: str
    host: str = ""
    pid: int = 0
    concurrency: int = 0
    capabilities: ev.Capabilities = msgspec.field(default_factory=ev.Capabilities)
    status: Literal["online", "quarantined", "left", "lost", "unknown"] = "unknown"
    registered_at: datetime | None = None
    last_heartbeat: datetime | None = None
    lost_at: datetime | None = None
    reason: str = ""
    infra_failures: int = 0
    """Attempts in a row that ended for infrastructure reasons (reset by any real result)."""
    quarantines: int = 0
    quarantined_until: datetime | None = None
    draining: bool = False
    full_until: datetime | None = None
    """It handed an attempt back for being at capacity: no new work for it before then (`note_capacity`)."""


AT_CAPACITY = "worker at capacity"
"""How a worker's TaskReleased reason begins when it had no free slot for the assignment."""
FULL_BACKOFF = timedelta(seconds=1)


def backoff_delay(policy: RetryPolicy, task_id: str, failures: int) -> float:
    """Exponential backoff with full jitter, deterministic per (task, failure) so every replica and
    every replay computes the same delay."""
    ceiling = min(policy.max_delay_seconds, policy.retry_delay_seconds * 2 ** max(failures - 1, 0))
    if not policy.jitter:
        return ceiling
    digest = hashlib.blake2b(f"{task_id}:{failures}".encode(), digest_size=8).digest()
    return ceiling * int.from_bytes(digest) / 2**64


def _retry_at(time: datetime, delay: float) -> datetime:
    """When a requeued task may run again; a delay or clock past year 9999 means never, not a crash."""
    try:
        return time + timedelta(seconds=delay)
    except OverflowError:
        return datetime.max.replace(tzinfo=time.tzinfo)


def _current_attempt(task: TaskState, event: ev.AttemptEvent) -> bool:
    return (
        task.status in ACTIVE and event.attempt == task.attempt and event.worker_id == task.worker_id
    )


def _after_failure(task: TaskState, event: ev.AttemptEvent, status: TaskStatus, reason: str) -> TaskState:
    """An attempt ended badly: requeue with backoff while retries remain, else settle on `status`."""
    assert task.spec is not None
    failures = task.failures + 1
    if failures <= task.spec.retry_policy.max_retries:
        delay = backoff_delay(task.spec.retry_policy, task.task_id, failures)
        return msgspec.structs.replace(
            task, status="pending", failures=failures, reason=reason,
            not_before=_retry_at(event.time, delay),
        )
    return msgspec.structs.replace(
        task, status=status, failures=failures, reason=reason, finished_at=event.time,
    )


def evolve_task(task: TaskState | None, event: ev.TaskEvent) -> TaskState | None:
    """The task state machine. Returns the task unchanged for events that do not apply."""
    match event:
        case ev.TaskSubmitted() if task is None:
            return TaskState(
                run_id=event.run_id, task_id=event.task_id, submitter=event.submitter,
                project=event.project or event.submitter, spec=event.spec, submission=event.id,
                submitted_at=event.time,
            )
        case ev.TaskRejected() if task is None:
            return TaskState(
                run_id=event.run_id, task_id=event.task_id, status="rejected",
                submitter=admission.rejected_submitter(event),
                reason=event.reason, submitted_at=event.time, finished_at=event.time,
            )
        case _ if task is None or task.terminal:
            return task
        case ev.TaskAssigned() if task.status in QUEUED and event.attempt == task.attempt + 1:
            return msgspec.structs.replace(
                task, status="assigned", attempt=event.attempt, worker_id=event.worker_id,
                assigned_at=event.time, started_at=None, not_before=None, reason="",
            )
        case ev.TaskStarted() if task.status == "assigned" and _current_attempt(task, event):
            return msgspec.structs.replace(task, status="running", started_at=event.time)
        case ev.ResultReported() if _current_attempt(task, event):
            settled = msgspec.structs.replace(
                task, duration_s=event.duration_s, counts=event.counts,
                started_at=task.started_at or task.assigned_at,
            )
            if event.outcome in RETRYABLE_OUTCOMES and not task_error(event):
                return _after_failure(settled, event, event.outcome, event.reason or event.output_tail[-200:])
            return msgspec.structs.replace(settled, status=event.outcome, finished_at=event.time,
                                           reason=event.reason)
        case ev.TaskFailed() if _current_attempt(task, event) and event.category == "worker":
            if task.lost + 1 < MAX_LOST_ATTEMPTS:
                return msgspec.structs.replace(
                    task, status="pending", lost=task.lost + 1, reason=f"worker: {event.reason}",
                )
            return msgspec.structs.replace(
                task, status="error", lost=task.lost + 1, finished_at=event.time,
                reason=f"lost {task.lost + 1} times with its worker; last: {event.reason}",
            )
        case ev.TaskFailed() if _current_attempt(task, event):
            return _after_failure(task, event, "error", f"{event.category}: {event.reason}")
        case ev.TaskReleased() if _current_attempt(task, event):
            return msgspec.structs.replace(task, status="pending", reason=event.reason)
        case ev.TaskPreempted() if _current_attempt(task, event) and not task.preempting:
            return msgspec.structs.replace(task, preempted_attempt=event.attempt)
        case ev.TaskUnschedulable() if task.status == "pending":
            return msgspec.structs.replace(
                task, status="unschedulable", unschedulable=task.unschedulable + 1, reason=event.reason,
            )
        case ev.TaskDeadlineMissed() if task.deadline_missed is None:
            return msgspec.structs.replace(task, deadline_missed=event.time)
        case ev.TaskCancelled():
            return msgspec.structs.replace(
                task, status="cancelled", reason=event.reason, finished_at=event.time,
            )
    return task


def task_error(event: ev.ResultReported) -> bool:
    """An `error` of the task's own making (a collection error, bad pytest arguments): final, and no
    mark against the worker that found it."""
    return event.outcome == "error" and event.category == "task"


def note_outcome(worker: WorkerState, event: ev.AttemptEvent) -> WorkerState:
    """A settled attempt's verdict on its worker's health: infrastructure failures in a row count
    towards quarantine; a real result (even failing tests, or a test file that does not import) shows
    the worker works."""
    infra = (isinstance(event, ev.TaskFailed) and event.category in INFRA_CATEGORIES) or (
        isinstance(event, ev.ResultReported) and event.outcome == "error" and not task_error(event))
    if infra:
        return msgspec.structs.replace(worker, infra_failures=worker.infra_failures + 1)
    if isinstance(event, ev.ResultReported) and (event.outcome in ("passed", "failed") or task_error(event)):
        if worker.status == "quarantined":  # the probe came through
            return msgspec.structs.replace(worker, status="online", infra_failures=0, quarantines=0,
                                           quarantined_until=None, reason="")
        return msgspec.structs.replace(worker, infra_failures=0)
    return worker


def note_capacity(worker: WorkerState, event: ev.AttemptEvent) -> WorkerState:
    """A worker that hands an attempt back for being at capacity runs more than the fold knows (an
    attempt it still runs after it was declared lost and came back, or events a replica has yet to
    see): it gets no new work for FULL_BACKOFF, so scheduler and worker do not trade assignments and
    releases as fast as they can publish. Any other settling of an attempt of its frees it again.
    Event times only: a replay decides the same."""
    if isinstance(event, ev.TaskReleased) and event.reason.startswith(AT_CAPACITY):
        return msgspec.structs.replace(worker, full_until=event.time + FULL_BACKOFF)
    return worker if worker.full_until is None else msgspec.structs.replace(worker, full_until=None)


def evolve_worker(worker: WorkerState | None, event: ev.Event) -> WorkerState | None:
    match event:
        case ev.WorkerRegistered() if worker is not None and worker.registered_at is not None \
                and event.time <= worker.registered_at:
            return worker  # the same registration stored again, or an older one
        case ev.WorkerRegistered():
            return WorkerState(
                worker_id=event.worker_id, host=event.host, pid=event.pid,
                concurrency=event.concurrency, capabilities=event.capabilities, status="online",
                registered_at=event.time,
                last_heartbeat=worker.last_heartbeat if worker else None,
            )
        case ev.WorkerHeartbeat():
            base = worker or WorkerState(worker_id=event.worker_id)
            if base.last_heartbeat and base.last_heartbeat >= event.time:
                return base
            back = base.status == "lost" and base.lost_at is not None and event.time > base.lost_at
            return msgspec.structs.replace(
                base, last_heartbeat=event.time, status="online" if back else base.status,
                reason="" if back else base.reason,
            )
        case ev.WorkerLeft() if worker is not None:
            return msgspec.structs.replace(worker, status="left", reason=event.reason)
        # Verdicts apply whatever the worker's status: heartbeats come from another stream, so whether
        # one landed before or after a verdict differs between a live fold and a replay, and the
        # outcome must not (a rebuilt read model equals the live one).
        case ev.WorkerLost() if worker is not None and worker.status != "left":
            lost_at = max(worker.lost_at, event.time) if worker.lost_at else event.time
            return msgspec.structs.replace(worker, status="lost", lost_at=lost_at, reason=event.reason)
        case ev.WorkerQuarantined() if worker is not None and worker.status != "left":
            return msgspec.structs.replace(
                worker, status="quarantined", quarantined_until=event.until, quarantines=worker.quarantines + 1,
                infra_failures=0, reason=event.reason,
            )
        case ev.WorkerDrainRequested() if worker is not None:
            return msgspec.structs.replace(worker, draining=True)
    return worker


def queue_order(task: TaskState) -> tuple:
    """Lower priority number first; among equal priority the earliest deadline first (tasks with no
    deadline after those with one); then submission order, then task id."""
    assert task.spec is not None and task.submitted_at is not None
    deadline = task.spec.deadline
    return (task.spec.priority, deadline is None, deadline or task.submitted_at, task.submitted_at, task.task_id)


def _queued(task: TaskState | None) -> bool:
    return task is not None and task.status in QUEUED and task.spec is not None


def _watched(task: TaskState | None) -> bool:
    """Unsettled with a deadline not yet recorded as missed."""
    return (task is not None and not task.terminal and task.spec is not None
            and task.spec.deadline is not None and task.deadline_missed is None)


class Queues:
    """The waiting work, indexed as the fold goes so that a scheduling round looks only at what it
    may act on, never at every task (10,000 queued tasks must not make each round scan 10,000):

        lanes      project -> its queued tasks whose dependencies all passed, in `queue_order`
        waiting    dependency id -> queued tasks still waiting for it to pass
        doomed     queued tasks with a dependency that ended without passing (to be cancelled)
        pending    requirements (as JSON) -> pending tasks with them (one unschedulable verdict each)
        deadlines  (deadline, task id) of unsettled tasks whose miss is not yet recorded
        unstarted  (assigned_at, task id) of attempts assigned but not started, oldest first (the
                   start deadline, `schedule.not_started`)
        served     project -> its fair-share clock: assignments so far, but set to `clock` when its
                   lane fills again if behind it (start-time fair queueing, equal weights), so an
                   idle project banks no credit and a busy one cannot starve a newcomer
        clock      the highest served value any project had when assigned a task (the fair-share
                   "virtual time"; a max, so it does not depend on the order assignments are stored)

    Dicts stand for ordered sets: iteration follows the log, so every replica sees the same order.
    Updates tolerate a task missing from an index (a fold loaded from a snapshot has empty indexes).
    """

    def __init__(self) -> None:
        self.lanes: dict[str, SortedList] = {}
        self.waiting: dict[str, dict[str, None]] = {}
        self.doomed: dict[str, None] = {}
        self.pending: dict[bytes, dict[str, None]] = {}
        self.deadlines = SortedList()
        self.unstarted = SortedList()
        self.served: dict[str, float] = {}
        self.clock = 0.0

    def update(self, before: TaskState | None, after: TaskState, tasks: dict[str, TaskState]) -> None:
        """Account for one task's change from `before` to `after` (already stored in `tasks`)."""
        if _queued(before) and not _queued(after):
            self._dequeue(before)  # type: ignore[arg-type]
            if after.status in ACTIVE:
                served = self.served.get(after.project, 0.0)
                self.clock = max(self.clock, served)
                self.served[after.project] = served + 1.0
        elif _queued(after) and not _queued(before):
            self._enqueue(after, tasks)
        was_pending = before is not None and before.status == "pending" and before.spec is not None
        if was_pending and after.status != "pending":
            key = msgspec.json.encode(before.spec.requirements)  # type: ignore[union-attr]
            self.pending.get(key, {}).pop(before.task_id, None)
        elif after.status == "pending" and after.spec is not None and not was_pending:
            self.pending.setdefault(msgspec.json.encode(after.spec.requirements), {})[after.task_id] = None
        if _watched(before) and not _watched(after):
            self.deadlines.discard((before.spec.deadline, before.task_id))  # type: ignore[union-attr]
        elif _watched(after) and not _watched(before):
            self.deadlines.add((after.spec.deadline, after.task_id))  # type: ignore[union-attr]
        if before is not None and before.status == "assigned":
            self.unstarted.discard((before.assigned_at, before.task_id))
        if after.status == "assigned":
            self.unstarted.add((after.assigned_at, after.task_id))
        if before is None or before.status != after.status:
            if after.status == "passed":
                for waiter in self.waiting.pop(after.task_id, {}):
                    task = tasks[waiter]
                    if _queued(task) and self._dependencies_passed(task, tasks):
                        self._ready(task)
            elif after.status in TERMINAL:
                for waiter in self.waiting.get(after.task_id, {}):
                    self.doomed[waiter] = None

    @staticmethod
    def _dependencies_passed(task: TaskState, tasks: dict[str, TaskState]) -> bool:
        assert task.spec is not None
        return all(dep in tasks and tasks[dep].status == "passed" for dep in task.spec.dependencies)

    def _enqueue(self, task: TaskState, tasks: dict[str, TaskState]) -> None:
        assert task.spec is not None
        unpassed = [dep for dep in task.spec.dependencies if dep not in tasks or tasks[dep].status != "passed"]
        if not unpassed:
            self._ready(task)
            return
        for dep in unpassed:
            self.waiting.setdefault(dep, {})[task.task_id] = None
        if any(dep in tasks and tasks[dep].status in TERMINAL for dep in unpassed):
            self.doomed[task.task_id] = None

    def _ready(self, task: TaskState) -> None:
        """Into its project's lane; a project whose lane was empty rejoins at the clock."""
        lane = self.lanes.get(task.project)
        if lane is None:
            lane = self.lanes[task.project] = SortedList()
            self.served[task.project] = max(self.served.get(task.project, 0.0), self.clock)
        lane.add(queue_order(task))

    def _dequeue(self, task: TaskState) -> None:
        assert task.spec is not None
        lane = self.lanes.get(task.project)
        if lane is not None:
            lane.discard(queue_order(task))
            if not lane:
                del self.lanes[task.project]
        for dep in task.spec.dependencies:
            waiters = self.waiting.get(dep)
            if waiters is not None:
                waiters.pop(task.task_id, None)
                if not waiters:
                    del self.waiting[dep]
        self.doomed.pop(task.task_id, None)


class Invalid(msgspec.Struct, frozen=True):
    """A message the fold could not accept, waiting for the coordinator's TaskRejected."""

    seq: int
    subject: str
    raw: bytes
    reason: str


def admit(event: ev.Event, subject: str, data: bytes | None = None) -> str | None:
    """Why an otherwise decodable event cannot be accepted (None when it can), whatever the fold
    knows; `data` is the message as stored (for its size)."""
    reason = subjects.mismatch(event, subject)
    if reason is None and isinstance(event, ev.TaskSubmitted):
        too_big = admission.oversize(event, data)
        if too_big is not None:
            return too_big
        for token in (event.run_id, event.task_id, event.submitter):
            if not subjects.is_token(token):
                return f"{token!r} is not a valid id (letters, digits, _ and -; at most 80)"
        try:
            validate(event.spec)
        except SpecError as exc:
            return str(exc)
    return reason


def dependency_cycle(task_id: str, dependencies: list[str], tasks: dict[str, TaskState]) -> list[str] | None:
    """The path task_id -> ... -> task_id that submitting it would close, through the known tasks'
    dependencies (depth first, in declaration order, so the answer is deterministic); None if none.
    Known tasks never form a cycle among themselves (each was checked when it came), so any cycle
    runs through the new task; a dependency on a task not yet submitted just waits."""
    seen: set[str] = set()
    stack: list[tuple[str, list[str]]] = [(dep, [task_id, dep]) for dep in reversed(dependencies)]
    while stack:
        node, path = stack.pop()
        if node == task_id:
            return path
        if node in seen:
            continue
        seen.add(node)
        known = tasks.get(node)
        if known is not None and known.spec is not None:
            stack.extend((dep, [*path, dep]) for dep in reversed(known.spec.dependencies))
    return None


class Applied(NamedTuple):
    """What one message did: the accepted event, or why it was not accepted."""

    event: ev.Event | None
    invalid_reason: str | None


class Fold:
    """Every task and worker, folded from raw stream messages in stream order."""

    def __init__(self) -> None:
        self.tasks: dict[str, TaskState] = {}
        self.workers: dict[str, WorkerState] = {}
        self.active: dict[str, set[str]] = {}
        """worker id -> ids of its assigned or running tasks (derived, kept for the scheduler)."""
        self.queues = Queues()
        """The waiting work, indexed for the scheduler (derived)."""
        self.owners: dict[str, str] = {}
        """run id -> its owner: the submitter of its first task, admitted or rejected on the record
        (`admission.foreign_run`)."""
        self.task_seq: dict[tuple[str, str], int] = {}
        self.invalid: dict[int, Invalid] = {}
        self.ignored = 0
        self.last_seq = 0

    def apply(self, subject: str, seq: int, data: bytes) -> Applied:
        """Fold one stream message. Never raises on bad input: it is set aside or counted."""
        parsed = subjects.parse(subject)
        if parsed.run_id:
            self.task_seq[(parsed.run_id, parsed.task_id)] = seq
        self.last_seq = max(self.last_seq, seq)
        try:
            event = ev.decode(data)
        except ev.DecodeError as exc:
            return self._set_aside(seq, subject, data, str(exc))
        reason = admit(event, subject, data) or self._conflict(event)
        if reason is not None:
            return self._set_aside(seq, subject, data, reason)
        self.apply_event(event)
        return Applied(event, None)

    def _conflict(self, event: ev.Event) -> str | None:
        """A submission of a task id that is taken (by another run, or as another event), into a run
        another submitter owns, or whose dependencies would close a cycle with the tasks known so far
        (see `dtf.admission`); or a cancel without authority over the task (`subjects.may_cancel`)."""
        if isinstance(event, ev.TaskSubmitted):
            known = self.tasks.get(event.task_id)
            reason = (admission.foreign_run(event.run_id, event.submitter, self.owners)
                      or admission.taken_task_id(event, known))
            if reason is None and known is None:
                cycle = dependency_cycle(event.task_id, event.spec.dependencies, self.tasks)
                if cycle:
                    return f"dependency cycle: {' -> '.join(cycle)}"
            return reason
        elif isinstance(event, ev.TaskCancelled) and (task := self.tasks.get(event.task_id)) is not None \
                and not subjects.may_cancel(event.by, task.submitter):
            return f"{event.by} may not cancel task {event.task_id} of {task.submitter}"
        return None

    def _set_aside(self, seq: int, subject: str, data: bytes, reason: str) -> Applied:
        """Submissions (and anything on a malformed task subject) await a TaskRejected; any other bad
        message is only counted here (the projector keeps each one in its invalid_events table)."""
        kind = subjects.parse(subject).kind
        if kind in ("submitted", "") and subject.startswith(f"{subjects.PREFIX}.task."):
            self.invalid[seq] = Invalid(seq, subject, data, reason)
        else:
            self.ignored += 1
        return Applied(None, reason)

    def apply_event(self, event: ev.Event) -> None:
        if isinstance(event, ev.TaskEvent):
            before = self.tasks.get(event.task_id)
            if isinstance(event, ev.TaskRejected):
                self.invalid.pop(event.source_seq, None)
                if before is None and admission.foreign_run(
                        event.run_id, admission.rejected_submitter(event), self.owners) is not None:
                    self.ignored += 1  # someone else's message in an owned run: on the record, not a task of it
                    return
            if before is not None and before.run_id != event.run_id:
                self.ignored += 1
                return
            after = evolve_task(before, event)
            if after is None or after is before:
                self.ignored += 1
                return
            self.tasks[event.task_id] = after
            if before is None and after.submitter:
                self.owners.setdefault(after.run_id, after.submitter)
            self._index(before, after)
            if isinstance(event, (ev.ResultReported, ev.TaskFailed)) and event.worker_id in self.workers:
                self.workers[event.worker_id] = note_outcome(self.workers[event.worker_id], event)
            if isinstance(event, (ev.ResultReported, ev.TaskFailed, ev.TaskReleased)) and event.worker_id in self.workers:
                self.workers[event.worker_id] = note_capacity(self.workers[event.worker_id], event)
        else:
            worker_id = event.worker_id  # type: ignore[attr-defined]
            after_worker = evolve_worker(self.workers.get(worker_id), event)
            if after_worker is not None:
                self.workers[worker_id] = after_worker

    def _index(self, before: TaskState | None, after: TaskState) -> None:
        if before is not None and before.status in ACTIVE:
            self.active.get(before.worker_id, set()).discard(after.task_id)
        if after.status in ACTIVE:
            self.active.setdefault(after.worker_id, set()).add(after.task_id)
        self.queues.update(before, after, self.tasks)

    def run_tasks(self, run_id: str) -> list[TaskState]:
        return [t for t in self.tasks.values() if t.run_id == run_id]
