"""View models: pure functions from a `Board` (and the time now) to the rows each view shows.

No Panel, no I/O: these are what the unit tests check, and what every open tab shares (the app
computes them once per board version, not once per tab).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from dtf import events as ev
from dtf.state import queue_order
from dtf.spec import command_line, test_paths
from dtf.state import QUEUED, TERMINAL, TaskState, WorkerState
from dtf.ui.board import Alert, Board, ResultDetail, series_key

EPOCH = datetime.min.replace(tzinfo=UTC)
"""Sorts before any real time (a rejected garbage submission may have none)."""
STATUS_ORDER = ("pending", "unschedulable", "assigned", "running", "passed", "failed", "error", "timed_out",
                "cancelled", "rejected")


def age(then: datetime | None, now: datetime) -> str:
    """A short human age: 4s, 3m, 2h, 5d; '-' when unknown; 0s for a clock slightly ahead."""
    if then is None:
        return "-"
    seconds = max(0, int((now - then).total_seconds()))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    return f"{seconds:.1f}s" if seconds < 120 else f"{seconds / 60:.1f}m"


def task_label(task: TaskState) -> str:
    """What the task runs, in a few words: its name, else its paths or command."""
    spec = task.spec
    if spec is None:
        return task.reason[:60] if task.status == "rejected" else ""
    if spec.name:
        return spec.name
    try:
        text = " ".join(test_paths(spec)) if spec.type == "test" else command_line(spec)
    except ValueError:
        text = ""
    return text if len(text) <= 60 else text[:57] + "..."


def capabilities(caps: ev.Capabilities) -> str:
    parts = ["/".join(caps.hardware), f"{caps.cores} cores"]
    if caps.memory_gb:
        parts.append(f"{caps.memory_gb:.0f} GB")
    parts += [f"{gpu.name} ({gpu.memory_gb:.0f} GB)" for gpu in caps.gpus]
    parts += [f"{k}={v}" for k, v in sorted(caps.tags.items())]
    return ", ".join(parts)


@dataclass(frozen=True)
class Summary:
    workers_online: int
    workers: int
    queued: int
    running: int
    passed: int
    failed: int
    last_seq: int


def summary(board: Board) -> Summary:
    states = Counter(t.status for t in board.fold.tasks.values())
    return Summary(
        workers_online=sum(w.status == "online" for w in board.fold.workers.values()),
        workers=len(board.fold.workers),
        queued=sum(states[s] for s in QUEUED),
        running=states["assigned"] + states["running"],
        passed=states["passed"],
        failed=sum(states[s] for s in TERMINAL - {"passed", "cancelled"}),
        last_seq=board.last_seq,
    )


def summary_tiles(board: Board) -> list[tuple[str, object, str]]:
    """The summary strip: (label, value, state the tile is coloured as)."""
    s = summary(board)
    return [("workers online", f"{s.workers_online}/{s.workers}", "online"), ("queued", s.queued, "pending"),
            ("running", s.running, "running"), ("passed", s.passed, "passed"), ("failed", s.failed, "failed"),
            ("events", s.last_seq, "")]


def worker_state(worker: WorkerState) -> str:
    return f"{worker.status} (draining)" if worker.draining and worker.status != "left" else worker.status


def worker_rows(board: Board, now: datetime) -> list[dict]:
    rows = []
    for worker in sorted(board.fold.workers.values(), key=lambda w: (w.status == "left", w.worker_id)):
        current = sorted(board.fold.active.get(worker.worker_id, ()))
        quarantine = "-"
        if worker.status == "quarantined" and worker.quarantined_until is not None:
            quarantine = f"until {worker.quarantined_until:%H:%M:%S} (#{worker.quarantines}): {worker.reason}"
        rows.append({
            "worker": worker.worker_id, "host": worker.host, "state": worker_state(worker),
            "capabilities": capabilities(worker.capabilities),
            "slots": f"{len(current)}/{worker.concurrency}",
            "current task": ", ".join(current) or "-",
            "heartbeat": age(worker.last_heartbeat or worker.registered_at, now),
            "quarantine": quarantine,
        })
    return rows


def queue_rows(board: Board, now: datetime, limit: int = 100) -> list[dict]:
    """Waiting tasks in the order the scheduler will take them."""
    queued = [t for t in board.fold.tasks.values() if t.status in QUEUED and t.spec is not None
              and t.submitted_at is not None]
    rows = []
    for position, task in enumerate(sorted(queued, key=queue_order)[:limit], start=1):
        assert task.spec is not None
        waiting = [f"{d}" for d in task.spec.dependencies
                   if board.fold.tasks.get(d) is None or board.fold.tasks[d].status != "passed"]
        why = task.reason or (f"after {', '.join(waiting)}" if waiting else "")
        if task.not_before is not None and task.not_before > now:
            why = f"retry in {age(now, task.not_before)}" + (f"; {why}" if why else "")
        rows.append({
            "#": position, "task": task.task_id, "run": task.run_id, "what": task_label(task),
            "priority": task.spec.priority, "state": task.status, "waiting": age(task.submitted_at, now),
            "why": why or "-",
        })
    return rows


@dataclass(frozen=True)
class Bar:
    worker: str
    task: str
    start: datetime
    end: datetime
    status: str
    open: bool


def timeline(board: Board, now: datetime, since: datetime | None = None) -> list[Bar]:
    """Attempt spans per worker; one still open runs until now."""
    bars = []
    for segment in board.segments:
        end = segment.end or now
        if since is not None and end < since:
            continue
        bars.append(Bar(segment.worker_id, segment.task_id, segment.start, max(end, segment.start),
                        segment.status, segment.end is None))
    return bars


def run_rows(board: Board, limit: int = 50) -> list[dict]:
    """Runs, newest first, with their task states and test counts."""
    runs: dict[str, list[TaskState]] = {}
    for task in board.fold.tasks.values():
        runs.setdefault(task.run_id, []).append(task)
    first = {run: min((t.submitted_at for t in tasks if t.submitted_at), default=None) for run, tasks in runs.items()}
    rows = []
    for run_id in sorted(runs, key=lambda r: (first[r] or EPOCH, r), reverse=True)[:limit]:
        tasks = runs[run_id]
        states = Counter(t.status for t in tasks)
        rows.append({
            "run": run_id, "submitted": f"{first[run_id]:%H:%M:%S}" if first[run_id] else "-",
            "tasks": len(tasks), "done": sum(t.terminal for t in tasks),
            "passed": states["passed"], "failed": sum(states[s] for s in TERMINAL - {"passed"}),
            "tests": _tests(tasks), "state": run_state(tasks),
        })
    return rows


def _tests(tasks: list[TaskState]) -> str:
    passed = sum(t.counts.passed for t in tasks)
    failed = sum(t.counts.failed + t.counts.errors for t in tasks)
    skipped = sum(t.counts.skipped for t in tasks)
    return f"{passed} passed, {failed} failed, {skipped} skipped"


def run_state(tasks: list[TaskState]) -> str:
    if not all(t.terminal for t in tasks):
        return "running"
    return "passed" if all(t.status == "passed" for t in tasks) else "failed"


def task_rows(board: Board, run_id: str) -> list[dict]:
    tasks = sorted((t for t in board.fold.tasks.values() if t.run_id == run_id),
                   key=lambda t: (t.submitted_at or EPOCH, t.task_id))
    return [{
        "task": t.task_id, "what": task_label(t), "state": t.status, "worker": t.worker_id or "-",
        "attempts": t.attempt, "duration": duration(t.duration_s),
        "tests": f"{t.counts.passed}/{t.counts.failed + t.counts.errors}/{t.counts.skipped}",
        "reason": t.reason[:120] or "-",
    } for t in tasks]


def test_rows(detail: ResultDetail | None) -> list[dict]:
    """The tests a result carried inline; the read model has them when they went to the store."""
    if detail is None:
        return []
    return [{"test": t.nodeid, "outcome": t.outcome, "duration": duration(t.duration_s), "message": t.message[:200]}
            for t in sorted(detail.tests, key=lambda t: (t.outcome != "failed", t.nodeid))]


def status_counts(board: Board) -> dict[str, int]:
    states = Counter(t.status for t in board.fold.tasks.values())
    return {s: states[s] for s in STATUS_ORDER if states[s]}


def alert_rows(board: Board, now: datetime, flaky: Sequence[dict] = (), limit: int = 50) -> list[dict]:
    """The newest alerts first: the board's, and the read model's flaky tests (as of their last flip)."""
    alerts = [*board.alerts, *(flaky_alert(row) for row in flaky)]
    return [{"when": age(a.time, now) + " ago", "severity": a.severity, "kind": a.kind, "about": a.subject,
             "what": a.message} for a in sorted(alerts, key=lambda a: a.time, reverse=True)[:limit]]


def flaky_alert(row: dict) -> Alert:
    """One row of the `flaky` query: a test that passed and failed on the same commit and hardware."""
    try:
        seen = datetime.fromisoformat(str(row.get("last_seen")))
    except ValueError:
        seen = EPOCH
    commit = str(row.get("commit") or "")[:10]
    what = (f"passed {row.get('passed')}, failed {row.get('failed')} of {row.get('runs')} runs on commit {commit}"
            f" ({row.get('hardware')}): {row.get('flips')} flips")
    return Alert(seen if seen.tzinfo else seen.replace(tzinfo=UTC), "warning", "flaky", str(row.get("test")), what)


@dataclass(frozen=True)
class Trend:
    times: list[datetime]
    values: list[float]
    tasks: list[str]
    runs: list[str]
    flagged: list[int]
    """Indexes of the points the detector flagged: an anomaly's outlier, a regression's results since the change."""


def trend(board: Board, key: str) -> Trend:
    points = list(board.series.get(key, ()))
    flagged_ids = set()
    for found in board.detections:
        if key not in (found.series, series_key(found.metric, found.labels)):
            continue
        if isinstance(found, ev.AnomalyDetected):  # the outlier, not the results that confirmed it
            flagged_ids |= {p.result_id for p in points if p.result_id in found.result_ids and p.value == found.value}
        else:  # a regression: the results since the change
            flagged_ids |= set(found.result_ids)
    flagged = [i for i, p in enumerate(points) if p.result_id in flagged_ids]
    return Trend([p.time for p in points], [p.value for p in points], [p.task_id for p in points],
                 [p.run_id for p in points], flagged)


def forecast_band(times: list[datetime], forecast: dict) -> dict[str, list]:
    """The forecast's interval as a band: at the last run (what it expected there) and at the next
    runs, placed at the series' median spacing (runs have no times before they happen)."""
    if not times or "last" not in forecast:
        return {"time": [], "lo": [], "hi": [], "mean": []}
    gaps = sorted((b - a) for a, b in zip(times, times[1:])) or [timedelta(minutes=1)]
    step = gaps[len(gaps) // 2]
    last = forecast["last"]
    ahead = forecast.get("forecast", [])
    return {
        "time": [times[-1], *(times[-1] + step * f["step"] for f in ahead)],
        "lo": [last["lo"], *(f["lo"] for f in ahead)], "hi": [last["hi"], *(f["hi"] for f in ahead)],
        "mean": [last["expected"], *(f["mean"] for f in ahead)],
    }


def forecast_note(forecast: dict | str) -> str:
    if isinstance(forecast, str):
        return forecast
    last = forecast["last"]
    where = "OUTSIDE" if last["outside"] else "inside"
    return (f"{forecast['model']} {forecast['level']} % band: the last run ({number(last['value'])}) is {where} "
            f"[{number(last['lo'])}, {number(last['hi'])}]; shaded ahead: the next {len(forecast.get('forecast', []))} runs")


def number(value: float) -> str:
    """4 significant digits, without exponents for the sizes benchmarks report (4036918 -> 4,037,000)."""
    return f"{float(f'{value:.4g}'):,.0f}" if abs(value) >= 1e4 else f"{value:.4g}"
