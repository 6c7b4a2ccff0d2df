"""A small, realistic history of one run, as the raw messages a stream would hold (tests and demos).

It has a pass with tests and metrics, a lost attempt retried on another worker whose result list sits
in the artifacts store, a released attempt, cancellations, a duplicate republished after the dedup
window (same event, another Nats-Msg-Id), garbage on a submission subject with the coordinator's
rejection, a result forged by a worker that was not assigned, a result on another worker's subject,
workers registering, leaving and heartbeating. Times are fixed, so every build is identical.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import msgspec

from dtf import events as ev
from dtf import subjects
from dtf.spec import RetryPolicy, TaskSpec
from dtf.streams.bus import StoredMsg
from dtf.streams.topology import EVENTS, HEARTBEATS

T0 = datetime(2025, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Publish:
    """One message to store: its subject, bytes and the Nats-Msg-Id it is published with."""

    subject: str
    data: bytes
    msg_id: str


@dataclass
class History:
    events: list[Publish] = field(default_factory=list)
    heartbeats: list[Publish] = field(default_factory=list)
    artifacts: dict[tuple[str, str], bytes] = field(default_factory=dict)
    """Objects for the artifacts store by (worker, name): a ResultReported's tests_ref names one in
    its worker's bucket."""

    def stored(self) -> list[StoredMsg]:
        """The messages as an empty stream pair would store them (sequences from 1 in each)."""
        return [
            StoredMsg(stream, seq, p.subject, p.data)
            for stream, published in ((EVENTS, self.events), (HEARTBEATS, self.heartbeats))
            for seq, p in enumerate(published, 1)
        ]

    def tests(self) -> dict[tuple[str, str], list[ev.TestOutcome]]:
        """The artifacts decoded as the projector's shell would fetch them."""
        return {
            key: msgspec.json.decode(data, type=list[ev.TestOutcome])
            for key, data in self.artifacts.items()
        }


class _Builder:
    def __init__(self, run_id: str) -> None:
        self.run_id = run_id
        self.history = History()
        self.clock = T0

    def tick(self) -> datetime:
        self.clock += timedelta(seconds=1)
        return self.clock

    def emit(self, event: ev.Event) -> ev.Event:
        target = self.history.heartbeats if isinstance(event, ev.WorkerHeartbeat) else self.history.events
        target.append(Publish(subjects.subject_for(event), ev.encode(event), event.id))
        return event

    def raw(self, subject: str, data: bytes, msg_id: str) -> None:
        target = self.history.heartbeats if subject.startswith("dtf.hb.") else self.history.events
        target.append(Publish(subject, data, msg_id))

    def again(self, event: ev.Event) -> None:
        """The same event stored a second time: a publisher retrying after the dedup window."""
        self.raw(subjects.subject_for(event), ev.encode(event), f"{event.id}-retried")

    def submit(self, task_id: str, spec: TaskSpec) -> TaskSpec:
        self.emit(ev.TaskSubmitted(
            id=f"{task_id}-submitted", time=self.tick(), run_id=self.run_id, task_id=task_id,
            submitter="alice", project="demo", spec=spec,
        ))
        return spec

    def assign(self, task_id: str, attempt: int, worker: str, spec: TaskSpec) -> None:
        self.emit(ev.TaskAssigned(
            id=f"{task_id}-{attempt}-assigned", time=self.tick(), run_id=self.run_id, task_id=task_id,
            attempt=attempt, worker_id=worker, coordinator="c1", spec=spec,
        ))

    def start(self, task_id: str, attempt: int, worker: str) -> None:
        self.emit(ev.TaskStarted(
            id=f"{task_id}-{attempt}-started", time=self.tick(), run_id=self.run_id, task_id=task_id,
            attempt=attempt, worker_id=worker, pid=4000 + attempt,
        ))

    def result(self, task_id: str, attempt: int, worker: str, outcome: str, **fields) -> ev.ResultReported:
        return self.emit(ev.ResultReported(  # type: ignore[return-value]
            id=f"{task_id}-{attempt}-result-{worker}", time=self.tick(), run_id=self.run_id,
            task_id=task_id, attempt=attempt, worker_id=worker, outcome=outcome, **fields,
        ))

    def heartbeat(self, worker: str) -> None:
        self.emit(ev.WorkerHeartbeat(
            id=f"hb-{worker}-{self.clock.timestamp():.0f}", time=self.tick(), worker_id=worker,
            running=[], cpu_percent=12.5, memory_percent=40.0,
        ))


def _tests(*outcomes: tuple[str, str]) -> list[ev.TestOutcome]:
    return [
        ev.TestOutcome(nodeid=nodeid, outcome=outcome, duration_s=0.25, message="" if outcome == "passed"
                       else f"{nodeid} {outcome}")  # type: ignore[arg-type]
        for nodeid, outcome in outcomes
    ]


def _counts(tests: list[ev.TestOutcome]) -> ev.TestCounts:
    counts = ev.TestCounts()
    for test in tests:
        name = "errors" if test.outcome == "error" else test.outcome
        setattr(counts, name, getattr(counts, name) + 1)
    return counts


def history(run_id: str = "r1") -> History:
    """The sample run. Task and worker ids start with `run_id`, so one stream can hold several runs."""
    b = _Builder(run_id)
    t1, t2, t3, t4, t5, t6, t9 = (f"{run_id}-t{n}" for n in (1, 2, 3, 4, 5, 6, 9))
    w1, w2 = f"{run_id}-w1", f"{run_id}-w2"
    b.emit(ev.WorkerRegistered(
        id=f"{w1}-registered", time=b.tick(), worker_id=w1, host="gpu-box", pid=101, concurrency=2,
        capabilities=ev.Capabilities(hardware=["cpu", "cuda"], cores=16, memory_gb=64.0,
                                     gpus=[ev.Gpu(name="A100", memory_gb=80.0, cuda_compute=8.0)]),
    ))
    w2_registered = b.emit(ev.WorkerRegistered(
        id=f"{w2}-registered", time=b.tick(), worker_id=w2, host="cpu-box", pid=202,
        capabilities=ev.Capabilities(hardware=["cpu"], cores=4, memory_gb=8.0),
    ))
    b.heartbeat(w1)
    b.heartbeat(w2)

    # t1: passes on w1 with tests and metrics; w2 forges a failure for it while it runs.
    spec = b.submit(t1, TaskSpec(type="test", name="unit", config={"paths": ["tests/unit"]},
                                 labels={"suite": "unit"}, priority=3))
    b.assign(t1, 1, w1, spec)
    b.start(t1, 1, w1)
    b.result(t1, 1, w2, "failed", counts=ev.TestCounts(failed=1),
             tests=_tests(("tests/unit/test_forged.py::test_x", "failed")))
    tests = _tests(("tests/unit/test_a.py::test_one", "passed"),
                   ("tests/unit/test_a.py::test_two", "passed"),
                   ("tests/unit/test_b.py::test_skip", "skipped"))
    t1_result = b.result(t1, 1, w1, "passed", exit_code=0, duration_s=2.5, counts=_counts(tests),
                         tests=tests, metrics={"rss_mb": 512.0}, labels={"python": "3.11"},
                         log_ref=f"logs/{t1}/1")
    b.again(t1_result)

    # t2: attempt 1 is lost on w2, attempt 2 fails on w1 with its test list in the artifacts store.
    spec = b.submit(t2, TaskSpec(type="test", config={"paths": ["tests/slow"]},
                                 retry_policy=RetryPolicy(max_retries=1, retry_delay_seconds=0.0)))
    b.assign(t2, 1, w2, spec)
    b.start(t2, 1, w2)
    b.emit(ev.TaskFailed(id=f"{t2}-1-failed", time=b.tick(), run_id=run_id, task_id=t2, attempt=1,
                         worker_id=w2, category="worker", reason="worker stopped heartbeating"))
    b.assign(t2, 2, w1, spec)
    b.start(t2, 2, w1)
    tests = _tests(("tests/slow/test_c.py::test_ok", "passed"),
                   ("tests/slow/test_c.py::test_bad", "failed"),
                   ("tests/slow/test_c.py::test_err", "error"))
    ref = f"results/{t2}/2.json"
    b.history.artifacts[(w1, ref)] = msgspec.json.encode(tests)
    b.result(t2, 2, w1, "failed", exit_code=1, duration_s=7.0, counts=_counts(tests), tests_ref=ref,
             output_tail="1 failed, 1 error", log_ref=f"logs/{t2}/2")

    # t3: released by w2 (draining), passes on w1; a result on w1's subject that names w2 is invalid.
    spec = b.submit(t3, TaskSpec(type="command", config={"command": "make check"}))
    b.assign(t3, 1, w2, spec)
    b.emit(ev.TaskReleased(id=f"{t3}-1-released", time=b.tick(), run_id=run_id, task_id=t3, attempt=1,
                           worker_id=w2, reason="draining"))
    b.assign(t3, 2, w1, spec)
    mislabeled = ev.ResultReported(id=f"{t3}-2-mislabeled", time=b.tick(), run_id=run_id, task_id=t3,
                                   attempt=2, worker_id=w2, outcome="passed")
    b.raw(subjects.task(run_id, t3, "result", w1), ev.encode(mislabeled), mislabeled.id)
    b.result(t3, 2, w1, "passed", exit_code=0, duration_s=1.0)

    # t4: cancelled while running; t5: cancelled while pending.
    spec = b.submit(t4, TaskSpec(type="command", config={"command": "sleep 600"}))
    b.assign(t4, 1, w2, spec)
    b.start(t4, 1, w2)
    b.emit(ev.TaskCancelled(id=f"{t4}-cancelled", time=b.tick(), run_id=run_id, task_id=t4,
                            reason="no longer needed", by="alice"))
    b.submit(t5, TaskSpec(type="command", config={"command": "true"}))
    b.emit(ev.TaskCancelled(id=f"{t5}-cancelled", time=b.tick(), run_id=run_id, task_id=t5, by="alice"))

    # t6: a benchmark with metrics.
    spec = b.submit(t6, TaskSpec(type="benchmark", config={"command": "bench", "model": "bert"}))
    b.assign(t6, 1, w1, spec)
    b.start(t6, 1, w1)
    b.result(t6, 1, w1, "passed", exit_code=0, duration_s=30.0,
             metrics={"throughput": 1234.5, "latency_ms": 8.25}, labels={"model": "bert"})

    # Garbage on a submission subject (the run owner's own broken message: anyone else's would be no
    # task of this run), and the coordinator's rejection of it.
    garbage = subjects.task(run_id, t9, "submitted", "alice")
    b.raw(garbage, b"{not json", f"{t9}-garbage")
    b.emit(ev.TaskRejected(id=f"{t9}-rejected", time=b.tick(), run_id=run_id, task_id=t9,
                           reason="not an event object", raw="{not json", source_subject=garbage,
                           source_seq=len(b.history.events)))

    # w2 leaves; its registration is stored again later and must not bring it back.
    b.heartbeat(w1)
    b.heartbeat(w2)
    b.emit(ev.WorkerLeft(id=f"{w2}-left", time=b.tick(), worker_id=w2, reason="drained"))
    b.again(w2_registered)
    b.heartbeat(w1)
    b.raw(subjects.heartbeat(f"{run_id}-w3"), b"garbage", f"{run_id}-w3-garbage")
    return b.history


async def publish(js, published: list[Publish]) -> None:
    """Store the messages in order, each with its own Nats-Msg-Id."""
    for p in published:
        await js.publish(p.subject, p.data, headers={"Nats-Msg-Id": p.msg_id})


async def publish_history(js, h: History) -> None:
    """Artifacts first (a result is published after its test list is stored), then both streams."""
    from dtf.streams import buckets, topology

    for (worker, name), data in h.artifacts.items():
        bucket = topology.artifacts_bucket(worker)
        await buckets.create(js, bucket)
        await (await js.object_store(bucket)).put(name, data)
    await publish(js, h.events)
    await publish(js, h.heartbeats)
