"""What the dashboard knows: the domain's own fold of the event log, plus the few things a screen
needs that the fold forgets (each attempt's span on its worker, each task's last result details,
benchmark points, alerts).

`Board` is pure: stream messages in, state out, no I/O and no clock, so the live feed, a replay to
a point in time and the unit tests all build it the same way. Tasks and workers come from
`dtf.state.Fold`, the very fold the coordinator and the projector use, so the dashboard can never
disagree with them about a task's state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime

import msgspec

from dtf import events as ev
from dtf import subjects
from dtf.state import ACTIVE, Fold, TaskState, WorkerState

MAX_SEGMENTS = 5000
"""Attempt spans kept for the timeline (the newest); older ones scroll out of view anyway."""
MAX_ALERTS = 500
MAX_POINTS = 1000
"""Points kept per benchmark series (the newest)."""
MAX_DETECTIONS = 1000


@dataclass(frozen=True)
class Stored:
    """One DTF_EVENTS message as the replay reads it."""

    seq: int
    subject: str
    data: bytes


@dataclass
class Segment:
    """One attempt of a task on a worker: from assignment (or start) to its end."""

    task_id: str
    attempt: int
    worker_id: str
    start: datetime
    end: datetime | None = None
    status: str = "assigned"
    """assigned, running, then how it ended: passed, failed, error, timed_out, cancelled, lost, released."""


@dataclass(frozen=True)
class Alert:
    time: datetime
    severity: str
    """"error" or "warning"."""
    kind: str
    subject: str
    message: str


@dataclass(frozen=True)
class Point:
    time: datetime
    value: float
    task_id: str
    run_id: str
    result_id: str


class ResultDetail(msgspec.Struct, frozen=True):
    """What a task's accepted result said beyond its counts: where its output and tests are."""

    attempt: int
    worker_id: str
    outcome: str
    exit_code: int | None
    tests: list[ev.TestOutcome]
    tests_ref: str | None
    output_tail: str
    log_ref: str | None


def series_key(name: str, labels: dict[str, str]) -> str:
    """One benchmark series: a metric name and the result's labels, as `name{k=v,...}`."""
    inner = ",".join(f"{k}={v}" for k, v in sorted(labels.items()))
    return f"{name}{{{inner}}}" if inner else name


SeriesOf = Callable[[TaskState, WorkerState | None, ev.ResultReported], Iterable[tuple[str, float]]]
"""(series name, value) for each metric an accepted result brings. `dtf dashboard` lends the
detector's own naming (`BENCHMARK:METRIC{k=v}@HARDWARE`), so trends and detections name a series alike."""


def metric_series(task: TaskState, worker: WorkerState | None, result: ev.ResultReported) -> list[tuple[str, float]]:
    """Without the detector's naming: one series per metric and label set."""
    return [(series_key(name, result.labels), value) for name, value in result.metrics.items()]


class Board:
    """Every task and worker folded from the log, and what the dashboard's views need besides."""

    def __init__(self, series_of: SeriesOf = metric_series) -> None:
        self.series_of = series_of
        self.fold = Fold()
        self.results: dict[str, ResultDetail] = {}
        self.segments: deque[Segment] = deque(maxlen=MAX_SEGMENTS)
        self._open: dict[tuple[str, int], Segment] = {}
        self.series: dict[str, deque[Point]] = {}
        self.alerts: deque[Alert] = deque(maxlen=MAX_ALERTS)
        self.detections: deque[ev.Detection] = deque(maxlen=MAX_DETECTIONS)
        """The detector's regressions and anomalies (events in the log, like everything else)."""
        self.version = 0
        """Bumped on every change: views re-render only when it moved."""

    @property
    def last_seq(self) -> int:
        return self.fold.last_seq

    def apply(self, subject: str, seq: int, data: bytes) -> None:
        """Fold one DTF_EVENTS message in stream order; bad input is counted by the fold, never raised."""
        if seq <= self.fold.last_seq:
            return  # a redelivery after a follow restarted
        before = self._task_of(subject)
        applied = self.fold.apply(subject, seq, data)
        self.version += 1
        event = applied.event
        if event is None:
            return
        if isinstance(event, ev.Detection):
            self._detection(event)
        elif isinstance(event, ev.TaskEvent):
            after = self.fold.tasks.get(event.task_id)
            if after is not None and after is not before:
                self._task_changed(event, before, after)
        else:
            self._worker_event(event)

    def apply_heartbeat(self, subject: str, data: bytes) -> None:
        """A worker's latest heartbeat (DTF_HEARTBEATS): only its time and the worker's status move."""
        try:
            event = ev.decode(data)
        except ev.DecodeError:
            return
        if isinstance(event, ev.WorkerHeartbeat) and subjects.mismatch(event, subject) is None:
            self.fold.apply_event(event)
            self.version += 1

    def _task_of(self, subject: str) -> TaskState | None:
        parsed = subjects.parse(subject)
        return self.fold.tasks.get(parsed.task_id) if parsed.task_id else None

    def _task_changed(self, event: ev.TaskEvent, before: TaskState | None, after: TaskState) -> None:
        if after.status in ACTIVE:
            key = (after.task_id, after.attempt)
            segment = self._open.get(key)
            if segment is None:
                segment = Segment(after.task_id, after.attempt, after.worker_id, event.time)
                self._open[key] = segment
                self.segments.append(segment)
            if after.status == "running" and segment.status != "running":
                segment.status, segment.start = "running", after.started_at or segment.start
        elif before is not None and before.status in ACTIVE:
            segment = self._open.pop((before.task_id, before.attempt), None)
            if segment is not None:
                segment.end, segment.status = event.time, _ending(event, after)
        if isinstance(event, ev.ResultReported):
            self._result(event, after)
        self._task_alert(event, after)

    def _result(self, event: ev.ResultReported, task: TaskState) -> None:
        self.results[event.task_id] = ResultDetail(
            event.attempt, event.worker_id, event.outcome, event.exit_code, event.tests, event.tests_ref,
            event.output_tail, event.log_ref,
        )
        for name, value in self.series_of(task, self.fold.workers.get(event.worker_id), event):
            points = self.series.setdefault(name, deque(maxlen=MAX_POINTS))
            points.append(Point(event.time, value, event.task_id, event.run_id, event.id))

    def _detection(self, event: ev.Detection) -> None:
        self.detections.append(event)
        if isinstance(event, ev.RegressionDetected):
            what = f"{event.metric} went from {event.before:.4g} to {event.after:.4g} ({event.size:+.0%})"
            self._alert(event.time, "error", "regression", event.series, what)
        elif isinstance(event, ev.AnomalyDetected) and event.direction == "worse":
            what = f"{event.metric} was {event.value:.4g}, expected about {event.expected:.4g} (task {event.task_id})"
            self._alert(event.time, "warning", "anomaly", event.series, what)

    def _task_alert(self, event: ev.TaskEvent, task: TaskState) -> None:
        if isinstance(event, ev.TaskDeadlineMissed):
            self._alert(event.time, "warning", "deadline", task.task_id,
                        f"missed its deadline {event.deadline:%Y-%m-%d %H:%M:%S} while {event.status or task.status}")
        elif isinstance(event, ev.TaskRejected):
            self._alert(event.time, "warning", "rejected", task.task_id, event.reason)
        elif task.terminal and task.status in ("error", "timed_out"):
            self._alert(event.time, "error", task.status, task.task_id, task.reason or task.status)

    def _worker_event(self, event: ev.Event) -> None:
        match event:
            case ev.WorkerLost():
                self._alert(event.time, "error", "lost", event.worker_id, event.reason or "no heartbeat")
            case ev.WorkerQuarantined():
                self._alert(event.time, "warning", "quarantined", event.worker_id,
                            f"until {event.until:%H:%M:%S}: {event.reason}")

    def _alert(self, time: datetime, severity: str, kind: str, subject: str, message: str) -> None:
        self.alerts.append(Alert(time, severity, kind, subject, message))


def _ending(event: ev.TaskEvent, after: TaskState) -> str:
    """How an attempt ended, for the timeline's colour."""
    match event:
        case ev.ResultReported():
            return event.outcome
        case ev.TaskFailed(category="worker"):
            return "lost"
        case ev.TaskFailed():
            return "error"
        case ev.TaskReleased():
            return "released"
    return after.status

