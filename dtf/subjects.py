"""Subject names: where each event is published, with the acting identity in the subject.

NATS stamps no publisher identity on a message and a JSON field can be forged, so the party an event
comes from (a submitter, a worker) is a subject token that server permissions can pin (#7):

    dtf.task.<run_id>.<task_id>.<kind>.<party>   task history (stream DTF_EVENTS)
    dtf.worker.<worker_id>.<kind>                worker lifecycle (stream DTF_EVENTS)
    dtf.hb.<worker_id>                           heartbeats, last one per worker (stream DTF_HEARTBEATS)
    dtf.query.<name>[.<submitter>]               request-reply to the projector's read model (core NATS)
    dtf.log.<submitter>.<task_id>.<worker_id>    live output chunks of a running task (core NATS)
    dtf.bucket.<kind>.<owner>                    asks a coordinator for an owner's object-store bucket

`<party>` is the submitter for `submitted`/`cancelled`, the worker for everything a worker publishes and
for `assigned` and `preempted` (the assignee, so each worker's durable consumer filters on its own id), and
`coordinator` for the coordinator's own verdicts (`rejected`, `unschedulable`, `deadline`), and
`detector` for the detector's findings (`regression`, `anomaly`). Those go on the subject of the task
whose result triggered them rather than a stream of their own: `dtf wait`, `dtf replay --task` and a
run's report see a run's regressions with the filters they already use, and the read model's rebuild
needs no new subject.
"""

from __future__ import annotations

from typing import NamedTuple

from dtf import events as ev
from dtf.spec import TOKEN_RE

PREFIX = "dtf"
TASKS = f"{PREFIX}.task.>"
WORKERS = f"{PREFIX}.worker.>"
HEARTBEATS = f"{PREFIX}.hb.>"
COORDINATOR = "coordinator"
DETECTOR = "detector"
"""The party of the detector's findings (`regression`, `anomaly`), on the triggering task's subject."""
INVALID_RUN = "_invalid"
"""Run token used for a rejection whose source subject named no usable run/task."""

TASK_KINDS: dict[type[ev.Event], str] = {
    ev.TaskSubmitted: "submitted",
    ev.TaskAssigned: "assigned",
    ev.TaskStarted: "started",
    ev.ResultReported: "result",
    ev.TaskFailed: "failed",
    ev.TaskReleased: "released",
    ev.TaskPreempted: "preempted",
    ev.TaskCancelled: "cancelled",
    ev.TaskRejected: "rejected",
    ev.TaskUnschedulable: "unschedulable",
    ev.TaskDeadlineMissed: "deadline",
    ev.RegressionDetected: "regression",
    ev.AnomalyDetected: "anomaly",
}
WORKER_KINDS: dict[type[ev.Event], str] = {
    ev.WorkerRegistered: "registered",
    ev.WorkerLeft: "left",
    ev.WorkerLost: "lost",
    ev.WorkerQuarantined: "quarantined",
    ev.WorkerDrainRequested: "drain",
}
KIND_TYPES: dict[str, type[ev.Event]] = {kind: cls for cls, kind in (TASK_KINDS | WORKER_KINDS).items()}


def is_token(value: str) -> bool:
    return bool(TOKEN_RE.match(value))


def task(run_id: str, task_id: str, kind: str, party: str) -> str:
    return f"{PREFIX}.task.{run_id}.{task_id}.{kind}.{party}"


def task_all(run_id: str, task_id: str) -> str:
    """Every event of one task: the subject filter the coordinator's expected-sequence check uses."""
    return f"{PREFIX}.task.{run_id}.{task_id}.>"


def run_all(run_id: str) -> str:
    return f"{PREFIX}.task.{run_id}.>"


def task_any_run(task_id: str) -> str:
    return f"{PREFIX}.task.*.{task_id}.>"


def assignments_for(worker_id: str) -> str:
    return f"{PREFIX}.task.*.*.assigned.{worker_id}"


def cancellations() -> str:
    return f"{PREFIX}.task.*.*.cancelled.*"


def preemptions_for(worker_id: str) -> str:
    """The coordinator's TaskPreempted requests to one worker (the worker is the subject's party)."""
    return f"{PREFIX}.task.*.*.preempted.{worker_id}"


def worker(worker_id: str, kind: str) -> str:
    return f"{PREFIX}.worker.{worker_id}.{kind}"


def heartbeat(worker_id: str) -> str:
    return f"{PREFIX}.hb.{worker_id}"


def live_log(submitter: str, task_id: str, worker_id: str) -> str:
    """Core NATS (not stored): output chunks of a running task, for `dtf logs --follow`. The task's
    owner and the worker running it are tokens, so permissions pin who may publish (the worker) and
    who may listen (the owner); pass "*" to listen for any of them."""
    return f"{PREFIX}.log.{submitter}.{task_id}.{worker_id}"


def live_log_worker(subject: str) -> str:
    """The worker a live-log chunk came from (its subject's last token, which permissions pin)."""
    return subject.rsplit(".", 1)[-1]


BUCKET_KINDS = ("ws", "artifacts")
"""`ws`: a submitter's workspaces bucket; `artifacts`: a worker's logs and test lists."""


def bucket_request(kind: str, owner: str) -> str:
    """Core NATS request to a coordinator to make `owner`'s bucket of `kind` (dtf.streams.buckets)."""
    return f"{PREFIX}.bucket.{kind}.{owner}"


def query(name: str, party: str | None = None) -> str:
    """A read-model query; with `party`, scoped to that submitter's own runs (the only query subjects
    a submitter may publish to)."""
    return f"{PREFIX}.query.{name}" if party is None else f"{PREFIX}.query.{name}.{party}"


def party_of(event: ev.Event) -> str:
    """The identity token an event is published under (see module docstring)."""
    if isinstance(event, ev.TaskSubmitted):
        return event.submitter
    if isinstance(event, ev.TaskCancelled):
        return event.by or COORDINATOR
    if isinstance(event, ev.AttemptEvent):
        return event.worker_id
    if isinstance(event, ev.Detection):
        return DETECTOR
    return COORDINATOR


def may_cancel(by: str, submitter: str) -> bool:
    """Whether a cancel published as `by` has authority over a task of `submitter`: its submitter's
    own, or the coordinator's (a failed dependency). An unknown submitter ("") cannot be checked."""
    return by in ("", COORDINATOR, submitter) or not submitter


def subject_for(event: ev.Event) -> str:
    """The one subject an event belongs on; the same function for every publisher."""
    if isinstance(event, ev.TaskEvent):
        return task(event.run_id, event.task_id, TASK_KINDS[type(event)], party_of(event))
    if isinstance(event, ev.WorkerHeartbeat):
        return heartbeat(event.worker_id)
    if type(event) in WORKER_KINDS:
        return worker(event.worker_id, WORKER_KINDS[type(event)])
    raise TypeError(f"no subject for {type(event).__name__}")


class Parsed(NamedTuple):
    """What a subject says about the message on it; `kind` is '' when the subject is malformed."""

    run_id: str
    task_id: str
    kind: str
    party: str


def parse(subject: str) -> Parsed:
    parts = subject.split(".")
    if len(parts) == 6 and parts[:2] == [PREFIX, "task"]:
        return Parsed(parts[2], parts[3], parts[4], parts[5])
    if len(parts) == 4 and parts[:2] == [PREFIX, "worker"]:
        return Parsed("", "", parts[3], parts[2])
    if len(parts) == 3 and parts[:2] == [PREFIX, "hb"]:
        return Parsed("", "", "heartbeat", parts[2])
    return Parsed("", "", "", "")


def mismatch(event: ev.Event, subject: str) -> str | None:
    """Why an event does not belong on the subject it arrived on (a forgery or a buggy client)."""
    expected = subject_for(event)
    if expected != subject:
        return f"{type(event).__name__} {event.id} arrived on {subject}, belongs on {expected}"
    return None
