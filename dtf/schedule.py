"""Scheduling policy: pure functions from folded state to decisions (events to publish).

`decide(fold, now, coordinator, policy)` returns every event the coordinator should publish given what
it has folded so far: workers declared lost after `policy.heartbeat_timeout` without a heartbeat, the
attempts they held failed (category "worker", so they are requeued), attempts that a worker still
there never started within `policy.start_deadline` failed the same way, workers quarantined after
repeated infrastructure failures (then probed with one attempt), rejections of set-aside
submissions, cancellations of tasks whose dependencies failed, tasks no registered worker can ever
run (TaskUnschedulable), missed deadlines (TaskDeadlineMissed), assignments of ready tasks to
capable workers with free slots (priority first, then fair share between projects), and preemptions
(TaskPreempted) of less urgent running attempts when urgent work has no capable free worker. It
reads only the fold's indexes of waiting work (`Fold.queues`), never every task; it reads no clock
and does no I/O, so replicas that folded the same log decide the same thing, and the stream
arbitrates their writes.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable
from datetime import datetime, timedelta

import msgspec

from dtf import events as ev
from dtf import subjects
from dtf.limits import RAW_KEEP, clip
from dtf.spec import Requirements
from dtf.state import ACTIVE, TERMINAL, Fold, TaskState, WorkerState

HEARTBEAT_TIMEOUT_S = 15.0
"""Default: three missed heartbeats at the worker's default 5 s interval."""
START_DEADLINE_S = 60.0
"""Default start deadline. A worker publishes TaskStarted as soon as it has checked that the assignment
is still current, before it fetches the workspace or builds the env (workers/attempt.py), so only
delivery and one publish count: under a second normally. 60 s is the worker's own budget for retrying
that publish through bus trouble (`workers.attempt.PUBLISH_RETRY_FOR_S`), so a worker riding out a
leader election is not overtaken, and it is well past the heartbeat timeout, so a dead worker is
found lost (the clearer verdict) first."""


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """The coordinator's tunables (`dtf coordinator --heartbeat-timeout --start-deadline`)."""

    heartbeat_timeout: timedelta = timedelta(seconds=HEARTBEAT_TIMEOUT_S)
    start_deadline: timedelta = timedelta(seconds=START_DEADLINE_S)
    """How long an assigned attempt may wait for its TaskStarted before it is taken back (`not_started`)."""
    quarantine_after: int = 3
    """Infrastructure failures in a row that quarantine a worker."""
    quarantine_base: timedelta = timedelta(seconds=30)
    """First quarantine; each one after a failed probe doubles it, up to `quarantine_max`."""
    quarantine_max: timedelta = timedelta(hours=1)
    no_workers_grace: timedelta = timedelta(seconds=HEARTBEAT_TIMEOUT_S)
    """With no worker registered at all, how long a task waits before it is called unschedulable
    ("no workers registered"): workers started beside the coordinator register well within it."""


def capable(worker: WorkerState, req: Requirements) -> bool:
    caps = worker.capabilities
    if req.hardware and not set(req.hardware) & set(caps.hardware):
        return False
    if req.min_memory_gb is not None and caps.memory_gb < req.min_memory_gb:
        return False
    if req.gpu_count and len(caps.gpus) < req.gpu_count:
        return False
    if req.min_cuda_compute is not None and not any(
        (gpu.cuda_compute or 0) >= req.min_cuda_compute for gpu in caps.gpus
    ):
        return False
    wanted = dict(req.tags)
    if req.browser:
        wanted["browser"] = req.browser
    if req.device_type:
        wanted["device_type"] = req.device_type
    return all(caps.tags.get(key) == value for key, value in wanted.items())


def last_seen(worker: WorkerState) -> datetime | None:
    return worker.last_heartbeat or worker.registered_at


def silent(worker: WorkerState, now: datetime, policy: Policy) -> bool:
    seen = last_seen(worker)
    return seen is not None and now - seen > policy.heartbeat_timeout


def slots(worker: WorkerState, active: int, now: datetime, policy: Policy) -> int:
    """Free slots: none while draining, silent, quarantined or just found full (`state.note_capacity`);
    one probe once a quarantine is over."""
    if worker.draining or silent(worker, now, policy):
        return 0
    if worker.full_until is not None and now < worker.full_until:
        return 0
    if worker.status == "online":
        due = worker.infra_failures >= policy.quarantine_after  # its quarantine is being decided
        return 0 if due else worker.concurrency - active
    if worker.status == "quarantined" and worker.quarantined_until is not None:
        probing = now >= worker.quarantined_until and worker.infra_failures == 0
        return 1 if probing and active == 0 else 0
    return 0


def _describe(req: Requirements) -> list[tuple[str, Requirements]]:
    """Each demand of a requirement on its own, with the words that name it."""
    parts: list[tuple[str, Requirements]] = []
    if req.hardware:
        parts.append((f"hardware {'|'.join(req.hardware)}", Requirements(hardware=req.hardware)))
    if req.min_memory_gb is not None:
        parts.append((f"min_memory_gb {req.min_memory_gb:g}", Requirements(min_memory_gb=req.min_memory_gb)))
    if req.gpu_count:
        parts.append((f"gpu_count {req.gpu_count}", Requirements(gpu_count=req.gpu_count)))
    if req.min_cuda_compute is not None:
        parts.append((f"min_cuda_compute {req.min_cuda_compute:g}",
                      Requirements(min_cuda_compute=req.min_cuda_compute)))
    if req.browser:
        parts.append((f"browser={req.browser}", Requirements(browser=req.browser)))
    if req.device_type:
        parts.append((f"device_type={req.device_type}", Requirements(device_type=req.device_type)))
    for key, value in sorted(req.tags.items()):
        parts.append((f"tag {key}={value}", Requirements(tags={key: value})))
    return parts


def unschedulable_reason(req: Requirements, workers: list[WorkerState]) -> str | None:
    """Why no worker in `workers` can ever run a task with these requirements (None if one can)."""
    if not workers:
        return "no workers registered"
    if any(capable(w, req) for w in workers):
        return None
    parts = _describe(req)
    missing = [words for words, alone in parts if not any(capable(w, alone) for w in workers)]
    if missing:
        return f"needs {', '.join(missing)}; no registered worker has {'it' if len(missing) == 1 else 'them'}"
    return f"needs {', '.join(words for words, _ in parts)} together; no registered worker has all of them"


def standing_workers(fold: Fold) -> list[WorkerState]:
    """Workers that may run work now or later: registered and not left. Quarantined, draining and
    lost ones count (a lost worker is back as soon as it heartbeats again; one gone for good should
    leave, or be restarted so that it registers anew)."""
    return [w for w in fold.workers.values() if w.registered_at is not None and w.status != "left"]


def unschedulable(fold: Fold, now: datetime, policy: Policy, skip: set[str] = frozenset()) -> list[ev.TaskUnschedulable]:
    """Pending tasks that no standing worker can ever run, whatever its free slots. With no worker at
    all, only tasks that have waited `policy.no_workers_grace` are reported ("no workers registered").
    One verdict per distinct requirements (`fold.queues.pending`), so a round costs the number of
    distinct requirements while every pending task is runnable."""
    workers = standing_workers(fold)
    decisions = []
    for ids in fold.queues.pending.values():
        if not ids:
            continue
        some = fold.tasks[next(iter(ids))]
        assert some.spec is not None
        reason = unschedulable_reason(some.spec.requirements, workers)
        if reason is None:
            continue
        for task_id in ids:
            task = fold.tasks[task_id]
            if task_id in skip:
                continue
            if not workers and (task.submitted_at is None or now - task.submitted_at < policy.no_workers_grace):
                continue
            decisions.append(ev.TaskUnschedulable(
                id=f"unschedulable-{task_id}-{task.unschedulable + 1}", time=now, run_id=task.run_id,
                task_id=task_id, reason=clip(reason),
            ))
    return decisions


def deadline_misses(fold: Fold, now: datetime, skip: set[str] = frozenset()) -> list[ev.TaskDeadlineMissed]:
    """Unsettled tasks past their spec.deadline, once each (earliest deadline first)."""
    decisions = []
    for deadline, task_id in fold.queues.deadlines:
        if now <= deadline:
            break
        if task_id in skip:
            continue
        task = fold.tasks[task_id]
        decisions.append(ev.TaskDeadlineMissed(
            id=f"deadline-{task_id}", time=now, run_id=task.run_id, task_id=task_id,
            deadline=deadline, status=task.status,
        ))
    return decisions


def free_slots(fold: Fold, now: datetime, policy: Policy) -> dict[str, int]:
    """Workers that can take work now, with how many more attempts each."""
    free = {}
    for worker in fold.workers.values():
        n = slots(worker, len(fold.active.get(worker.worker_id, ())), now, policy)
        if n > 0:
            free[worker.worker_id] = n
    return free


class _Fits:
    """Which workers of a round's `free` can run given requirements, computed once per distinct
    requirements and pruned as workers fill up (a round only ever loses free slots)."""

    def __init__(self, fold: Fold, free: dict[str, int]) -> None:
        self.fold = fold
        self.free = free
        self.known: dict[bytes, list[str]] = {}

    def workers(self, req: Requirements) -> list[str]:
        key = msgspec.json.encode(req)
        ids = self.known.get(key)
        if ids is None:
            ids = [wid for wid in self.free if capable(self.fold.workers[wid], req)]
        else:
            ids = [wid for wid in ids if wid in self.free]
        self.known[key] = ids
        return ids

    def best(self, req: Requirements) -> str | None:
        """The capable worker with the most free slots (ties: the greatest id)."""
        return max(self.workers(req), key=lambda wid: (self.free[wid], wid), default=None)

    def take(self, worker_id: str) -> None:
        self.free[worker_id] -= 1
        if not self.free[worker_id]:
            del self.free[worker_id]


def plan_assignments(
    fold: Fold, now: datetime, policy: Policy = Policy(), skip: set[str] = frozenset(),
) -> tuple[list[tuple[TaskState, str]], dict[str, int]]:
    """(task, worker) pairs for this round, and the free slots left after them.

    Priority first; among equal priority, fair share: the project with the least `served` goes next
    (each assignment adds one), so projects alternate however long one's queue is; within a project,
    `queue_order`. A task no free worker can run is passed over, never blocking the ones behind it.
    Cost: each project's lane is read only as far as this round assigns (plus what it passes over)."""
    free = free_slots(fold, now, policy)
    plan: list[tuple[TaskState, str]] = []
    if not free:
        return plan, free
    fits = _Fits(fold, free)
    lanes = {project: iter(lane) for project, lane in fold.queues.lanes.items()}

    def next_runnable(project: str) -> TaskState | None:
        for key in lanes[project]:
            if not free:  # the round is over: do not read on through the lane
                return None
            task = fold.tasks[key[-1]]
            assert task.spec is not None
            if task.task_id in skip or (task.not_before is not None and task.not_before > now):
                continue
            if fits.workers(task.spec.requirements):
                return task
        return None

    heads: dict[str, TaskState] = {}
    heap: list[tuple[int, float, str]] = []

    def push(project: str, served: float) -> None:
        task = next_runnable(project)
        if task is not None:
            assert task.spec is not None
            heads[project] = task
            heapq.heappush(heap, (task.spec.priority, served, project))

    for project in lanes:
        push(project, fold.queues.served.get(project, 0.0))
    while heap and free:
        _, served, project = heapq.heappop(heap)
        task = heads.pop(project)
        assert task.spec is not None
        worker_id = fits.best(task.spec.requirements)
        if worker_id is None:  # its workers filled up since it was picked: look further down its lane
            push(project, served)
            continue
        fits.take(worker_id)
        plan.append((task, worker_id))
        push(project, served + 1.0)
    return plan, free


def assignments(
    fold: Fold, now: datetime, coordinator: str, policy: Policy = Policy(), skip: set[str] = frozenset(),
) -> list[ev.TaskAssigned]:
    return [_assigned(task, worker_id, now, coordinator) for task, worker_id in plan_assignments(fold, now, policy, skip)[0]]


def _assigned(task: TaskState, worker_id: str, now: datetime, coordinator: str) -> ev.TaskAssigned:
    assert task.spec is not None
    attempt = task.attempt + 1
    return ev.TaskAssigned(
        id=f"assign-{task.task_id}-{attempt}", time=now, run_id=task.run_id, task_id=task.task_id,
        attempt=attempt, worker_id=worker_id, coordinator=coordinator, spec=task.spec, submitter=task.submitter,
    )


def preemptions(
    fold: Fold, now: datetime, policy: Policy, planned: set[str], free: dict[str, int], skip: set[str] = frozenset(),
) -> list[ev.TaskPreempted]:
    """Running attempts to hand back for more urgent work. A ready task that this round could not
    place (`planned` holds the placed ones, `free` the slots left) and that is strictly more urgent
    than some running attempt on a worker able to run it takes that worker's least urgent such
    attempt (the most recently started among equals: the least work lost). A slot already being
    handed back on a capable worker is taken instead of asking for another."""
    accepting = {w.worker_id: w for w in fold.workers.values() if slots(w, 0, now, policy) > 0}
    victims: list[TaskState] = []
    incoming: dict[str, int] = {}
    for worker_id in accepting:
        for task_id in sorted(fold.active.get(worker_id, ())):
            task = fold.tasks[task_id]
            if task.preempting:
                incoming[worker_id] = incoming.get(worker_id, 0) + 1
            elif task.status == "running" and task_id not in skip:
                victims.append(task)
    if not victims:
        return []
    least_urgent = max(t.spec.priority for t in victims if t.spec is not None)
    urgent = heapq.merge(*(lane.islice(0, lane.bisect_left((least_urgent,))) for lane in fold.queues.lanes.values()))
    decisions = []
    able_for: dict[bytes, set[str]] = {}
    for key in urgent:
        task = fold.tasks[key[-1]]
        assert task.spec is not None
        if task.task_id in planned or task.task_id in skip or (task.not_before is not None and task.not_before > now):
            continue
        req = msgspec.json.encode(task.spec.requirements)
        if req not in able_for:
            able_for[req] = {wid for wid, w in accepting.items() if capable(w, task.spec.requirements)}
        able = able_for[req]
        if any(free.get(wid) for wid in able):
            continue
        reserved = next((wid for wid in sorted(able) if incoming.get(wid)), None)
        if reserved is not None:
            incoming[reserved] -= 1
            continue
        options = [v for v in victims if v.worker_id in able and v.spec.priority > task.spec.priority]  # type: ignore[union-attr]
        if not options:
            continue
        victim = max(options, key=lambda v: (v.spec.priority, v.started_at, v.task_id))  # type: ignore[union-attr]
        victims.remove(victim)
        decisions.append(ev.TaskPreempted(
            id=f"preempt-{victim.task_id}-{victim.attempt}", time=now, run_id=victim.run_id,
            task_id=victim.task_id, attempt=victim.attempt, worker_id=victim.worker_id, by_task=task.task_id,
            reason=f"preempted for {task.task_id} (priority {task.spec.priority} over {victim.spec.priority})",  # type: ignore[union-attr]
        ))
        if not victims:
            break
    return decisions


def dependency_cancellations(fold: Fold, now: datetime) -> list[ev.TaskCancelled]:
    decisions = []
    for task_id in fold.queues.doomed:
        task = fold.tasks[task_id]
        assert task.spec is not None
        for dep in task.spec.dependencies:
            failed = fold.tasks.get(dep)
            if failed is not None and failed.status in TERMINAL and failed.status != "passed":
                decisions.append(ev.TaskCancelled(
                    id=f"cancel-{task.task_id}-dep", time=now, run_id=task.run_id,
                    task_id=task.task_id, reason=f"dependency {dep} ended {failed.status}",
                    by=subjects.COORDINATOR,
                ))
                break
    return decisions


def rejections(fold: Fold, now: datetime) -> list[ev.TaskRejected]:
    decisions = []
    for bad in fold.invalid.values():
        parsed = subjects.parse(bad.subject)
        usable = subjects.is_token(parsed.run_id) and subjects.is_token(parsed.task_id)
        decisions.append(ev.TaskRejected(
            id=f"reject-{bad.seq}", time=now,
            run_id=parsed.run_id if usable else subjects.INVALID_RUN,
            task_id=parsed.task_id if usable else f"seq{bad.seq}",
            reason=clip(bad.reason), raw=bad.raw[:RAW_KEEP].decode("utf-8", "replace"),
            source_subject=bad.subject, source_seq=bad.seq,
        ))
    return decisions


def lost_workers(fold: Fold, now: datetime, policy: Policy) -> list[ev.WorkerLost]:
    decisions = []
    for worker in fold.workers.values():
        if worker.status in ("online", "quarantined") and silent(worker, now, policy):
            seen = last_seen(worker)
            assert seen is not None
            decisions.append(ev.WorkerLost(
                id=f"lost-{worker.worker_id}-{seen.timestamp():.6f}", time=now, worker_id=worker.worker_id,
                last_seen=seen, reason=f"no heartbeat for {(now - seen).total_seconds():.1f}s",
            ))
    return decisions


def lost_attempts(fold: Fold, now: datetime) -> list[ev.TaskFailed]:
    """Attempts held by a worker that is lost or gone: fail them so they are requeued."""
    decisions = []
    for worker_id, task_ids in fold.active.items():
        worker = fold.workers.get(worker_id)
        if worker is None or worker.status not in ("lost", "left"):
            continue
        for task_id in sorted(task_ids):
            task = fold.tasks[task_id]
            assert task.status in ACTIVE
            decisions.append(ev.TaskFailed(
                id=f"lost-{task_id}-{task.attempt}", time=now, run_id=task.run_id, task_id=task_id,
                attempt=task.attempt, worker_id=worker_id, category="worker",
                reason=clip(f"worker {worker_id} {worker.status}" + (f" ({worker.reason})" if worker.reason else "")),
            ))
    return decisions


def not_started(fold: Fold, now: datetime, policy: Policy, skip: set[str] = frozenset()) -> list[ev.TaskFailed]:
    """Attempts assigned more than `policy.start_deadline` ago and still not started, on a worker that
    is not lost or gone (`lost_attempts` fails those): the assignment never reached the worker (its
    consumer was overwritten, the message was lost) or the worker never acted on it, yet it heartbeats.

    Each is failed as lost with its worker (category "worker", id `unstarted-<task>-<attempt>`): the
    task is requeued at once without using a retry, the attempt is no longer current, so its late
    start or result changes nothing (and the worker, which starts only if nothing landed on the task
    since it looked, skips it), and it counts towards the worker's quarantine like any other lost
    attempt: a worker that never receives its work stops attracting it. Reads the fold's index of
    unstarted attempts by assignment time only as far as they are due."""
    decisions = []
    for assigned_at, task_id in fold.queues.unstarted:
        if now - assigned_at <= policy.start_deadline:
            break
        task = fold.tasks[task_id]
        worker = fold.workers.get(task.worker_id)
        if task_id in skip or (worker is not None and worker.status in ("lost", "left")):
            continue
        waited = (now - assigned_at).total_seconds()
        decisions.append(ev.TaskFailed(
            id=f"unstarted-{task_id}-{task.attempt}", time=now, run_id=task.run_id, task_id=task_id,
            attempt=task.attempt, worker_id=task.worker_id, category="worker",
            reason=f"attempt {task.attempt} not started within {policy.start_deadline.total_seconds():g}s "
                   f"of assignment to {task.worker_id} (waited {waited:.1f}s)",
        ))
    return decisions


def quarantines(fold: Fold, now: datetime, policy: Policy) -> list[ev.WorkerQuarantined]:
    """Quarantine a worker after `quarantine_after` infrastructure failures in a row, and again (for
    twice as long) when its probe after a quarantine fails too."""
    decisions = []
    for worker in fold.workers.values():
        due = worker.status == "online" and worker.infra_failures >= policy.quarantine_after
        probe_failed = (worker.status == "quarantined" and worker.quarantined_until is not None
                        and now >= worker.quarantined_until and worker.infra_failures > 0)
        if not (due or probe_failed):
            continue
        length = min(policy.quarantine_max, policy.quarantine_base * 2 ** worker.quarantines)
        why = "its probe failed" if probe_failed else f"{worker.infra_failures} infrastructure failures in a row"
        decisions.append(ev.WorkerQuarantined(
            id=f"quarantine-{worker.worker_id}-{worker.quarantines + 1}-{worker.registered_at}", time=now,
            worker_id=worker.worker_id, until=now + length,
            reason=f"{why}; quarantined for {length.total_seconds():.0f}s",
        ))
    return decisions


def decide(fold: Fold, now: datetime, coordinator: str, policy: Policy = Policy()) -> Iterable[ev.Event]:
    """Everything to publish now, in a safe order: verdicts before new work. A task gets at most one
    of rejection, not-started failure, cancellation, unschedulable, deadline-missed and assignment per round (each would expect the
    same last sequence on the task's subject, so a second would only be refused); the rest follow
    in the next round, once the first is folded."""
    yield from lost_workers(fold, now, policy)
    yield from lost_attempts(fold, now)
    yield from quarantines(fold, now, policy)
    # A rejection may land on a known task's subject (its id submitted again): that task waits a round.
    rejected = rejections(fold, now)
    yield from rejected
    touched = {d.task_id for d in rejected}
    unstarted = not_started(fold, now, policy, touched)
    yield from unstarted
    cancelled = dependency_cancellations(fold, now)
    touched |= {d.task_id for d in unstarted} | {d.task_id for d in cancelled}
    yield from cancelled
    stuck = unschedulable(fold, now, policy, touched)
    touched |= {d.task_id for d in stuck}
    yield from stuck
    late = deadline_misses(fold, now, touched)
    touched |= {d.task_id for d in late}
    yield from late
    plan, free = plan_assignments(fold, now, policy, touched)
    yield from (_assigned(task, worker_id, now, coordinator) for task, worker_id in plan)
    yield from preemptions(fold, now, policy, {task.task_id for task, _ in plan}, free, touched)
