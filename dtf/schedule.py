"""Scheduling policy: pure functions from folded state to decisions (events to publish).

`decide(fold, now, coordinator, policy)` returns every event the coordinator should publish given what
it has folded so far: workers declared lost after `policy.heartbeat_timeout` without a heartbeat, the
attempts they held failed (category "worker", so they are requeued), workers quarantined after
repeated infrastructure failures (then probed with one attempt), rejections of set-aside
submissions, cancellations of tasks whose dependencies failed, tasks no registered worker can ever
run (TaskUnschedulable), missed deadlines (TaskDeadlineMissed), and assignments of ready tasks to
capable workers with free slots. It reads no clock and does no I/O,
so replicas that folded the same log decide the same thing, and the stream arbitrates their writes.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime, timedelta

import msgspec

from dtf import events as ev
from dtf import subjects
from dtf.spec import Requirements
from dtf.state import ACTIVE, QUEUED, TERMINAL, Fold, TaskState, WorkerState

HEARTBEAT_TIMEOUT_S = 15.0
"""Default: three missed heartbeats at the worker's default 5 s interval."""


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """The coordinator's tunables (`dtf coordinator --heartbeat-timeout`)."""

    heartbeat_timeout: timedelta = timedelta(seconds=HEARTBEAT_TIMEOUT_S)
    quarantine_after: int = 3
    """Infrastructure failures in a row that quarantine a worker."""
    quarantine_base: timedelta = timedelta(seconds=30)
    """First quarantine; each one after a failed probe doubles it, up to `quarantine_max`."""
    quarantine_max: timedelta = timedelta(hours=1)
    no_workers_grace: timedelta = timedelta(seconds=HEARTBEAT_TIMEOUT_S)
    """With no worker registered at all, how long a task waits before it is called unschedulable
    ("no workers registered"): workers started beside the coordinator register well within it."""


RAW_KEEP = 64 * 1024
"""How much of a rejected payload the TaskRejected keeps for audit."""


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
    """Free slots: none while draining, silent or quarantined; one probe once a quarantine is over."""
    if worker.draining or silent(worker, now, policy):
        return 0
    if worker.status == "online":
        due = worker.infra_failures >= policy.quarantine_after  # its quarantine is being decided
        return 0 if due else worker.concurrency - active
    if worker.status == "quarantined" and worker.quarantined_until is not None:
        probing = now >= worker.quarantined_until and worker.infra_failures == 0
        return 1 if probing and active == 0 else 0
    return 0


def ready(task: TaskState, tasks: dict[str, TaskState], now: datetime) -> bool:
    if task.status not in QUEUED or task.spec is None:
        return False
    if task.not_before is not None and task.not_before > now:
        return False
    return all(dep in tasks and tasks[dep].status == "passed" for dep in task.spec.dependencies)


def queue_order(task: TaskState) -> tuple:
    """Lower priority number first; among equal priority the earliest deadline first (tasks with no
    deadline after those with one); then submission order, then task id."""
    assert task.spec is not None and task.submitted_at is not None
    deadline = task.spec.deadline
    return (task.spec.priority, deadline is None, deadline or task.submitted_at, task.submitted_at, task.task_id)


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
    all, only tasks that have waited `policy.no_workers_grace` are reported ("no workers registered")."""
    workers = standing_workers(fold)
    verdicts: dict[bytes, str | None] = {}
    decisions = []
    for task in fold.tasks.values():
        if task.status != "pending" or task.spec is None or task.task_id in skip:
            continue
        if not workers and (task.submitted_at is None or now - task.submitted_at < policy.no_workers_grace):
            continue
        key = msgspec.json.encode(task.spec.requirements)
        if key not in verdicts:
            verdicts[key] = unschedulable_reason(task.spec.requirements, workers)
        reason = verdicts[key]
        if reason is not None:
            decisions.append(ev.TaskUnschedulable(
                id=f"unschedulable-{task.task_id}-{task.unschedulable + 1}", time=now, run_id=task.run_id,
                task_id=task.task_id, reason=reason,
            ))
    return decisions


def deadline_misses(fold: Fold, now: datetime, skip: set[str] = frozenset()) -> list[ev.TaskDeadlineMissed]:
    """Unsettled tasks past their spec.deadline, once each."""
    decisions = []
    for task in fold.tasks.values():
        if task.terminal or task.spec is None or task.spec.deadline is None or task.deadline_missed is not None:
            continue
        if now > task.spec.deadline and task.task_id not in skip:
            decisions.append(ev.TaskDeadlineMissed(
                id=f"deadline-{task.task_id}", time=now, run_id=task.run_id, task_id=task.task_id,
                deadline=task.spec.deadline, status=task.status,
            ))
    return decisions


def assignments(
    fold: Fold, now: datetime, coordinator: str, policy: Policy = Policy(), skip: set[str] = frozenset(),
) -> list[ev.TaskAssigned]:
    free = {w.worker_id: slots(w, len(fold.active.get(w.worker_id, ())), now, policy) for w in fold.workers.values()}
    if not any(slots > 0 for slots in free.values()):
        return []
    decisions: list[ev.TaskAssigned] = []
    queue = (t for t in fold.tasks.values() if t.task_id not in skip and ready(t, fold.tasks, now))
    for task in sorted(queue, key=queue_order):
        assert task.spec is not None
        candidates = [
            wid for wid, slots in free.items()
            if slots > 0 and capable(fold.workers[wid], task.spec.requirements)
        ]
        if not candidates:
            continue
        chosen = max(candidates, key=lambda wid: (free[wid], wid))
        free[chosen] -= 1
        attempt = task.attempt + 1
        decisions.append(ev.TaskAssigned(
            id=f"assign-{task.task_id}-{attempt}", time=now, run_id=task.run_id,
            task_id=task.task_id, attempt=attempt, worker_id=chosen, coordinator=coordinator,
            spec=task.spec,
        ))
    return decisions


def dependency_cancellations(fold: Fold, now: datetime) -> list[ev.TaskCancelled]:
    decisions = []
    for task in fold.tasks.values():
        if task.status not in QUEUED or task.spec is None:
            continue
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
            reason=bad.reason, raw=bad.raw[:RAW_KEEP].decode("utf-8", "replace"),
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
                reason=f"worker {worker_id} {worker.status}" + (f" ({worker.reason})" if worker.reason else ""),
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
    of cancellation, unschedulable, deadline-missed and assignment per round (each would expect the
    same last sequence on the task's subject, so a second would only be refused); the rest follow
    in the next round, once the first is folded."""
    yield from lost_workers(fold, now, policy)
    yield from lost_attempts(fold, now)
    yield from quarantines(fold, now, policy)
    yield from rejections(fold, now)
    cancelled = dependency_cancellations(fold, now)
    touched = {d.task_id for d in cancelled}
    yield from cancelled
    stuck = unschedulable(fold, now, policy, touched)
    touched |= {d.task_id for d in stuck}
    yield from stuck
    late = deadline_misses(fold, now, touched)
    touched |= {d.task_id for d in late}
    yield from late
    yield from assignments(fold, now, coordinator, policy, touched)
