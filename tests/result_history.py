"""Histories of finished tasks as the stream would hold them, for aggregation, flaky-test and report
tests: each `Finished` becomes a submission, an assignment, a start and a result, on workers that
registered with their hardware first. `project` folds them into a real DuckDB read model."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from dtf import events as ev
from dtf import subjects
from dtf.projections.projection import Projection
from dtf.spec import TaskSpec
from dtf.streams.bus import StoredMsg
from dtf.streams.topology import EVENTS

T0 = datetime(2025, 3, 1, tzinfo=UTC)
HARDWARE = {"w-cpu": ["cpu"], "w-gpu": ["cuda", "cpu"]}


@dataclass
class Finished:
    """One task that ran once: its tests (node id, outcome, seconds) and metrics."""

    run_id: str
    task_id: str
    worker: str = "w-cpu"
    at: timedelta = timedelta(0)
    type: str = "test"
    name: str = ""
    commit: str = ""
    branch: str = ""
    labels: dict[str, str] = field(default_factory=dict)
    tests: list[tuple[str, str, float]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    outcome: str = ""
    """Default: failed if a test failed or errored, else passed."""
    message: str = "assert 1 == 2"

    @property
    def time(self) -> datetime:
        return T0 + self.at

    def spec(self) -> TaskSpec:
        config = {"paths": ["tests"]} if self.type == "test" else {"command": "python bench.py"}
        return TaskSpec(type=self.type, name=self.name, config=config, labels=self.labels,  # type: ignore[arg-type]
                        commit=self.commit, branch=self.branch)

    def events(self) -> list[ev.Event]:
        spec = self.spec()
        tests = [ev.TestOutcome(nodeid=n, outcome=o, duration_s=d,  # type: ignore[arg-type]
                                message="" if o == "passed" else self.message) for n, o, d in self.tests]
        counts = ev.TestCounts()
        for test in tests:
            key = "errors" if test.outcome == "error" else test.outcome
            setattr(counts, key, getattr(counts, key) + 1)
        outcome = self.outcome or ("failed" if counts.failed or counts.errors else "passed")
        ids = {"run_id": self.run_id, "task_id": self.task_id}
        attempt = {**ids, "attempt": 1, "worker_id": self.worker}
        t = self.time
        return [
            ev.TaskSubmitted(id=f"{self.task_id}-s", time=t, submitter="ci", spec=spec, **ids),
            ev.TaskAssigned(id=f"{self.task_id}-a", time=t, coordinator="c", spec=spec, **attempt),
            ev.TaskStarted(id=f"{self.task_id}-st", time=t, **attempt),
            ev.ResultReported(id=f"{self.task_id}-r", time=t + timedelta(seconds=1), outcome=outcome,  # type: ignore[arg-type]
                              duration_s=sum(d for _, _, d in self.tests) or 1.0, counts=counts, tests=tests,
                              metrics=self.metrics, labels=self.labels, **attempt),
        ]


def messages(finished: list[Finished]) -> list[StoredMsg]:
    events: list[ev.Event] = [
        ev.WorkerRegistered(id=f"{w}-reg", time=T0 - timedelta(days=1), worker_id=w, host=w, pid=1, concurrency=64,
                            capabilities=ev.Capabilities(hardware=hw))
        for w, hw in HARDWARE.items()
    ]
    for task in finished:
        events += task.events()
    return [StoredMsg(EVENTS, seq, subjects.subject_for(e), ev.encode(e)) for seq, e in enumerate(events, 1)]


def project(finished: list[Finished]) -> Projection:
    """A fresh in-memory read model holding these tasks."""
    projection = Projection.open(":memory:")
    projection.apply_batch(messages(finished))
    return projection
