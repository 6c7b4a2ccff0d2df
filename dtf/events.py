"""The event contract: every state change in dtf is one of these versioned msgspec Structs.

Each event carries `id` (also sent as the Nats-Msg-Id header, so a retried publish is deduplicated),
`time` (UTC), `v` (its schema version) and the ids it concerns. On the wire an event is plain JSON with
a `type` tag, so any language can publish one. `decode` upgrades older versions (upcasting) so old
streams stay replayable; the JSON Schemas under streams/schemas/ are generated from these classes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

from dtf import wire
from dtf.spec import TaskSpec

ErrorCategory = Literal[
    "network", "resource", "worker", "task", "data", "hardware",
    "authentication", "authorization", "timeout", "unknown",
]
Outcome = Literal["passed", "failed", "error", "timed_out", "cancelled"]
TestStatus = Literal["passed", "failed", "skipped", "error"]


Time = Annotated[datetime, msgspec.Meta(tz=True)]
"""Every time on the wire carries its UTC offset: a naive one is refused at decoding, so no fold ever
compares a naive time with an aware one (live and in replay alike)."""


def now() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class Event(msgspec.Struct, kw_only=True, tag_field="type", omit_defaults=False):
    """Common envelope. Subclasses set `v` to their current schema version."""

    id: str = msgspec.field(default_factory=new_id)
    time: Time = msgspec.field(default_factory=now)
    v: int = 1


class TaskEvent(Event, kw_only=True):
    run_id: str
    task_id: str


class AttemptEvent(TaskEvent, kw_only=True):
    attempt: int
    worker_id: str


# --- task lifecycle -------------------------------------------------------------------------------


class TaskSubmitted(TaskEvent, tag=True, kw_only=True):
    """A submitter asks for a task. v2: spec.requirements.hardware is an any-of list (v1: one string).

    Optional spec fields added later with a default (`spec.deadline`) need no new version and no
    upcaster: an older submission without them decodes to the default. A reader older than the field
    refuses a spec that sets it (specs forbid unknown keys), so upgrade readers before writers."""

    v: int = 2
    submitter: str
    project: str = ""
    spec: TaskSpec


class TaskAssigned(AttemptEvent, tag=True, kw_only=True):
    """The coordinator gives attempt N of a task to one worker; the spec travels with it, and whose
    task it is (so the worker can tell a cancel with authority from a forged one; "" in
    assignments made before the field existed: any cancel goes)."""

    coordinator: str
    spec: TaskSpec
    submitter: str = ""


class TaskStarted(AttemptEvent, tag=True, kw_only=True):
    pid: int | None = None


class TestOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One test's result as the worker's pytest plugin recorded it. `message` is the crash message
    (or the skip reason); the rest is set for a failed or errored test only, each optional so a
    result from before the fields existed decodes as it did (no new version needed)."""

    nodeid: str
    outcome: TestStatus
    duration_s: float = 0.0
    message: str = ""
    longrepr: str = ""
    """The traceback as pytest prints it (`--tb=long`), capped at 64 KiB with a marker."""
    short: str = ""
    """The same in pytest's `--tb=short` style, capped at 8 KiB."""
    file: str = ""
    """Where it broke: the crash's file (else the test's), relative to the submitted tree's root."""
    line: int | None = None
    """The line in `file`, 1-based."""
    classname: str = ""
    """pytest's junitxml classname: `tests.test_mod.TestClass`."""
    stdout: str = ""
    stderr: str = ""
    """What the test printed, as pytest captured it, capped at 16 KiB each."""


class TestCounts(msgspec.Struct, kw_only=True):
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    errors: int = 0


class ResultReported(AttemptEvent, tag=True, kw_only=True):
    """The outcome of one attempt. `tests` may be moved to the artifacts object store when large
    (`tests_ref`: a JSON array of TestOutcome objects); `counts` always stays. The full output is in
    the artifacts store under `log_ref`, or entirely in `output_tail` when `log_ref` is null."""

    outcome: Outcome
    exit_code: int | None = None
    duration_s: float = 0.0
    counts: TestCounts = msgspec.field(default_factory=TestCounts)
    tests: list[TestOutcome] = []
    tests_ref: str | None = None
    metrics: dict[str, float] = {}
    labels: dict[str, str] = {}
    output_tail: str = ""
    log_ref: str | None = None
    category: ErrorCategory | None = None
    """Whose fault an `error` outcome is. "task": the task's own code, arguments or spec (a
    collection error, bad pytest arguments, a benchmark without metrics): it settles the task, is
    never retried and says nothing against the worker. Anything else, or none (results from before
    this field), is the infrastructure's: retried, and counted towards the worker's quarantine."""
    reason: str = ""
    """Why the worker judged the attempt so, in a line (the collection error, "no tests selected")."""


class TaskFailed(AttemptEvent, tag=True, kw_only=True):
    """An attempt ended without a result: the worker could not run it, or it was lost."""

    category: ErrorCategory = "unknown"
    reason: str


class TaskReleased(AttemptEvent, tag=True, kw_only=True):
    """A worker hands an attempt back unrun or unfinished (draining, over capacity): requeue it."""

    reason: str


class TaskPreempted(AttemptEvent, tag=True, kw_only=True):
    """The coordinator asks `worker_id` to hand back its running attempt N: more urgent work
    (`by_task`, a strictly lower priority number) has no capable free worker. The worker kills the
    attempt's process group and publishes TaskReleased, which requeues the task without using a
    retry. Until then the attempt holds its slot. Id `preempt-<task>-<attempt>`."""

    by_task: str
    reason: str = ""


class TaskCancelled(TaskEvent, tag=True, kw_only=True):
    """Stop a task. `by` (the subject's party) must be the task's submitter, or the coordinator (a
    failed dependency); any other cancel is set aside with its reason. An operator cancelling on a
    submitter's behalf publishes as that submitter (admins may) and names itself in `reason`."""

    reason: str = ""
    by: str = ""


class TaskUnschedulable(TaskEvent, tag=True, kw_only=True):
    """The coordinator finds that no registered worker (online, quarantined, draining or lost; not
    left) can ever run a pending task, whatever its free slots: `reason` names what is missing. The
    task keeps waiting and is assigned as soon as a capable worker has a free slot. Id
    `unschedulable-<task>-<n>` (n counts these events for the task), so replicas and retries agree."""

    reason: str


class TaskDeadlineMissed(TaskEvent, tag=True, kw_only=True):
    """A task not settled by its `spec.deadline`. Informational: the task keeps its place and runs on.
    Published once per task, with id `deadline-<task>`."""

    deadline: Time
    status: str = ""
    """The task's state when the deadline passed (pending, unschedulable, assigned or running)."""


class TaskRejected(TaskEvent, tag=True, kw_only=True):
    """A submission (or any message on a task subject) that could not be accepted, kept for audit."""

    reason: str
    raw: str = ""
    source_subject: str = ""
    source_seq: int = 0


# --- workers ----------------------------------------------------------------------------------------


class Gpu(msgspec.Struct, kw_only=True):
    name: str
    memory_gb: float
    cuda_compute: float | None = None


class Capabilities(msgspec.Struct, kw_only=True):
    hardware: list[str] = msgspec.field(default_factory=lambda: ["cpu"])
    cores: int = 1
    memory_gb: float = 0.0
    platform: str = ""
    python: str = ""
    gpus: list[Gpu] = []
    tags: dict[str, str] = {}


class WorkerRegistered(Event, tag=True, kw_only=True):
    worker_id: str
    host: str
    pid: int
    concurrency: int = 1
    capabilities: Capabilities = msgspec.field(default_factory=Capabilities)


class WorkerHeartbeat(Event, tag=True, kw_only=True):
    worker_id: str
    running: list[str] = []
    cpu_percent: float = 0.0
    memory_percent: float = 0.0


class WorkerLeft(Event, tag=True, kw_only=True):
    worker_id: str
    reason: str = ""


class WorkerLost(Event, tag=True, kw_only=True):
    """The coordinator declares a worker lost: no heartbeat for longer than the timeout. Its running
    attempts are then failed with category "worker" and requeued; a heartbeat after this brings it
    back online for new work, and its late results are recorded but settle nothing."""

    worker_id: str
    last_seen: Time | None = None
    reason: str = ""


class WorkerQuarantined(Event, tag=True, kw_only=True):
    """The coordinator stops giving a worker work until `until`: it failed several attempts in a row
    for infrastructure reasons. After that it gets one probe attempt; success ends the quarantine."""

    worker_id: str
    until: Time
    reason: str = ""


class WorkerDrainRequested(Event, tag=True, kw_only=True):
    """`dtf worker drain ID`: no new work for this worker; what it runs finishes. A new registration
    (the worker restarted) ends the drain."""

    worker_id: str
    by: str = ""
    reason: str = ""


# --- analysis (the detector, #5) -----------------------------------------------------------------


class Detection(TaskEvent, kw_only=True):
    """What the detector found in one series, published on the subject of the task whose result
    completed the finding (`run_id`, `task_id`; for an anomaly, the outlier's own result). A series
    is one benchmark metric (or one test's failure rate) under one set of labels on one kind of
    hardware, of one owner, named `BENCHMARK:METRIC{k=v,...}@HARDWARE` (see
    `dtf.projections.detection`). Ids are `<kind>-<series name hash>-<triggering result id>`, so a
    restarted or rebuilt detector publishes the same event with the same id.

    `owner` came later, with a default (no new version, no upcaster, as for TaskSubmitted's optional
    spec fields): a detection from before it decodes with "" and was made from a series every
    submitter's results went into."""

    series: str
    owner: str = ""
    """The submitter of the runs whose results make the series (the task's submitter): every result
    in `result_ids` and the `change_run_id` are its own."""
    benchmark: str
    metric: str
    labels: dict[str, str] = {}
    hardware: list[str] = []
    better: Literal["lower", "higher"]
    """Which way of the metric is better (lower for times and latencies, higher for throughput)."""
    size: float
    """Relative change, signed: (new - old) / |old|."""
    confidence: float
    """In [0, 1]: how unlikely the change is under the series' noise."""
    detector: str
    """The method and its settings, e.g. `page-hinkley(delta=0.5,threshold=8)`."""
    result_ids: list[str] = []
    """The ResultReported events (ids) that made the detection, oldest first."""


class RegressionDetected(Detection, tag=True, kw_only=True):
    """A level shift for the worse: the series moved from `before` to `after` (medians of the runs
    either side of the estimated change) and stayed there. `result_ids` are the results since the
    change, the last one the result that completed the detection; `change_run_id` is the run of the
    first of them."""

    before: float
    after: float
    change_run_id: str = ""


class AnomalyDetected(Detection, tag=True, kw_only=True):
    """A single outlier: `value` (one result) far from `expected` (the series' median), confirmed by
    the next result falling back in line. `direction` says whether the outlier was for the worse."""

    value: float
    expected: float
    direction: Literal["worse", "better"]


AnyEvent = (
    TaskSubmitted | TaskAssigned | TaskStarted | ResultReported | TaskFailed | TaskReleased
    | TaskPreempted | TaskCancelled | TaskRejected | TaskUnschedulable | TaskDeadlineMissed | WorkerRegistered | WorkerHeartbeat | WorkerLeft | WorkerLost
    | WorkerQuarantined | WorkerDrainRequested | RegressionDetected | AnomalyDetected
)
EVENT_TYPES: dict[str, type[Event]] = {
    cls.__name__: cls for cls in AnyEvent.__args__  # type: ignore[attr-defined]
}
CURRENT_VERSION: dict[str, int] = {
    name: next(f.default for f in msgspec.structs.fields(cls) if f.name == "v")
    for name, cls in EVENT_TYPES.items()
}


# --- wire format and upcasting ----------------------------------------------------------------------


class DecodeError(ValueError):
    """The bytes are not a valid event; the message says why in one line."""


class _Header(msgspec.Struct):
    type: str = ""
    v: int = 1
    id: Any = msgspec.UNSET
    time: Any = msgspec.UNSET


Upcaster = Callable[[dict[str, Any]], dict[str, Any]]


def _submitted_v1_to_v2(raw: dict[str, Any]) -> dict[str, Any]:
    requirements = raw.get("spec", {}).get("requirements", {})
    if isinstance(requirements.get("hardware"), str):
        requirements["hardware"] = [requirements["hardware"]]
    return {**raw, "v": 2}


UPCASTERS: dict[tuple[str, int], Upcaster] = {("TaskSubmitted", 1): _submitted_v1_to_v2}
"""(type, version) -> function turning that version's JSON object into the next version's."""

_header_decoder = msgspec.json.Decoder(_Header)
_decoders = {name: msgspec.json.Decoder(cls) for name, cls in EVENT_TYPES.items()}
_encoder = msgspec.json.Encoder()


def encode(event: Event) -> bytes:
    return _encoder.encode(event)


def _times(event: Event) -> list[datetime]:
    times = [event.time]
    if isinstance(event, TaskSubmitted | TaskAssigned) and event.spec.deadline is not None:
        times.append(event.spec.deadline)
    for name in ("deadline", "last_seen", "until"):
        value = getattr(event, name, None)
        if isinstance(value, datetime):
            times.append(value)
    return times


def _out_of_range(event: Event) -> str | None:
    """A time whose offset moves it past year 1 or 9999 in UTC: comparing or converting it would
    raise OverflowError in whoever folds it."""
    for value in _times(event):
        try:
            value.astimezone(UTC)
        except OverflowError:
            return f"time {value.isoformat()} is out of range in UTC"
    return None


def decode(data: bytes) -> AnyEvent:
    """Decode one event of any known type and version; DecodeError otherwise (never anything else).
    Nesting is bounded (`dtf.wire`), times must carry an offset and lie within range in UTC."""
    try:
        header = wire.decode(data, _header_decoder)
    except wire.WireError as exc:
        raise DecodeError(f"not an event object: {exc}") from None
    current = CURRENT_VERSION.get(header.type)
    if current is None:
        raise DecodeError(f"unknown event type {header.type!r}")
    if header.id is msgspec.UNSET or header.time is msgspec.UNSET:
        # Filled in from a random generator or the clock, they would differ on every replay.
        raise DecodeError(f"{header.type} needs both `id` and `time`")
    try:
        if header.v == current:
            event = _decoders[header.type].decode(data)
        elif header.v > current or header.v < 1:
            raise DecodeError(f"{header.type} schema version {header.v} is not supported (<= {current})")
        else:
            raw = msgspec.json.decode(data)
            for version in range(header.v, current):
                raw = UPCASTERS[(header.type, version)](raw)
            event = msgspec.convert(raw, EVENT_TYPES[header.type])
    except (msgspec.DecodeError, msgspec.ValidationError, UnicodeError, RecursionError) as exc:
        raise DecodeError(f"invalid {header.type}: {exc}") from None
    except (KeyError, TypeError, AttributeError) as exc:
        raise DecodeError(f"cannot upgrade {header.type} v{header.v}: {exc!r}") from None
    problem = _out_of_range(event)
    if problem is not None:
        raise DecodeError(f"invalid {header.type}: {problem}")
    return event
