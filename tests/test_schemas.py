"""The committed JSON Schemas (streams/schemas/) are the wire contract for other languages: they must
match the code, be valid JSON Schema, accept what dtf publishes and what a foreign client writes by hand,
and refuse what `decode` refuses."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import jsonschema
import pytest
from dtf.streams import schemas

from dtf import events as ev
from dtf import subjects
from dtf.spec import Requirements, RetryPolicy, TaskSpec
from dtf.state import Fold

COMMITTED = Path(schemas.__file__).parent / "schemas"
T0 = datetime(2025, 6, 1, 10, 0, tzinfo=UTC)
SPEC = TaskSpec(type="test", config={"test_file": "tests/test_x.py", "test_args": ["-x"]},
                requirements=Requirements(hardware=["cuda", "rocm"], min_memory_gb=8, min_cuda_compute=7.5),
                retry_policy=RetryPolicy(max_retries=2, retry_delay_seconds=30), dependencies=["t0"])
ATTEMPT = {"time": T0, "run_id": "r1", "task_id": "t1", "attempt": 1, "worker_id": "w1"}

SAMPLES: list[ev.Event] = [
    ev.TaskSubmitted(id="s1", time=T0, run_id="r1", task_id="t1", submitter="alice", project="p", spec=SPEC),
    ev.TaskAssigned(id="a1", **ATTEMPT, coordinator="c1", spec=SPEC),
    ev.TaskStarted(id="st1", **ATTEMPT, pid=42),
    ev.ResultReported(id="res1", **ATTEMPT, outcome="passed", exit_code=0, duration_s=1.5,
                      counts=ev.TestCounts(passed=3),
                      tests=[ev.TestOutcome(nodeid="tests/test_x.py::test_a", outcome="passed", duration_s=0.1)],
                      metrics={"throughput": 12.5}, labels={"model": "bert"}, output_tail="ok", log_ref="logs/1"),
    ev.TaskFailed(id="f1", **ATTEMPT, category="network", reason="connection reset"),
    ev.TaskReleased(id="rel1", **ATTEMPT, reason="draining"),
    ev.TaskPreempted(id="preempt-t1-1", **ATTEMPT, by_task="t2", reason="preempted for t2 (priority 1 over 5)"),
    ev.TaskCancelled(id="c1", time=T0, run_id="r1", task_id="t1", reason="user", by="alice"),
    ev.TaskRejected(id="rej1", time=T0, run_id="r1", task_id="t1", reason="bad", raw="{",
                    source_subject="dtf.task.r1.t1.submitted.alice", source_seq=7),
    ev.TaskUnschedulable(id="unschedulable-t1-1", time=T0, run_id="r1", task_id="t1",
                         reason="needs hardware cuda|rocm; no registered worker has it"),
    ev.TaskDeadlineMissed(id="deadline-t1", time=T0, run_id="r1", task_id="t1", deadline=T0, status="running"),
    ev.WorkerRegistered(id="reg1", time=T0, worker_id="w1", host="h", pid=1, concurrency=2,
                        capabilities=ev.Capabilities(hardware=["cpu", "cuda"], cores=8, memory_gb=32,
                                                     gpus=[ev.Gpu(name="A100", memory_gb=40, cuda_compute=8.0)])),
    ev.WorkerHeartbeat(id="hb1", time=T0, worker_id="w1", running=["t1"], cpu_percent=12.0),
    ev.WorkerLeft(id="left1", time=T0, worker_id="w1", reason="shutdown"),
    ev.WorkerLost(id="lost1", time=T0, worker_id="w1", last_seen=T0, reason="no heartbeat for 20.0s"),
    ev.WorkerQuarantined(id="q1", time=T0, worker_id="w1", until=T0, reason="3 infrastructure failures in a row"),
    ev.WorkerDrainRequested(id="d1", time=T0, worker_id="w1", by="alice", reason="maintenance"),
    ev.RegressionDetected(id="regression-ab12-res9", time=T0, run_id="r1", task_id="t1",
                          series="resnet:latency_ms{batch=8}@cuda", benchmark="resnet", metric="latency_ms",
                          labels={"batch": "8"}, hardware=["cuda"], better="lower", size=0.2, confidence=0.99,
                          detector="page-hinkley", result_ids=["res8", "res9"], before=10.0, after=12.0,
                          change_run_id="r0"),
    ev.AnomalyDetected(id="anomaly-ab12-res7", time=T0, run_id="r1", task_id="t1",
                       series="resnet:latency_ms{batch=8}@cuda", benchmark="resnet", metric="latency_ms",
                       better="lower", size=1.5, confidence=1.0, detector="robust-z", result_ids=["res7"],
                       value=25.0, expected=10.0, direction="worse"),
]

FOREIGN_SUBMISSION = """{
  "type": "TaskSubmitted",
  "id": "r42-unit-tests-1",
  "time": "2025-06-01T10:00:00.250+02:00",
  "v": 2,
  "run_id": "r42",
  "task_id": "unit-tests-1",
  "submitter": "ci-go",
  "project": "webgpu",
  "spec": {
    "type": "test",
    "priority": 1,
    "config": {"test_file": "tests/test_model.py", "test_args": ["--verbose", "--batch-size", "4"]},
    "requirements": {"hardware": ["cuda", "rocm"], "min_memory_gb": 8, "min_cuda_compute": 7.5},
    "timeout_seconds": 1800,
    "retry_policy": {"max_retries": 3, "retry_delay_seconds": 60},
    "dependencies": ["prepare-model-task-123"]
  }
}"""


def committed(name: str) -> dict:
    return json.loads((COMMITTED / f"{name}.json").read_text(encoding="utf-8"))


def validator(name: str) -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(committed(name), format_checker=jsonschema.FormatChecker())


def test_the_committed_schemas_match_a_fresh_export(tmp_path):
    written = schemas.export(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in COMMITTED.glob("*.json")), (
        "streams/schemas/ has missing or stale files: run `python -m dtf.streams.schemas`"
    )
    for path in written:
        assert path.read_bytes() == (COMMITTED / path.name).read_bytes(), (
            f"{path.name} drifted from dtf/events.py: run `python -m dtf.streams.schemas`"
        )


def test_all_schemas_is_what_the_committed_files_hold():
    schemas_by_name = schemas.all_schemas()
    assert list(schemas_by_name) == sorted(ev.EVENT_TYPES)
    assert all(schema == committed(name) for name, schema in schemas_by_name.items())


def test_the_export_is_byte_for_byte_stable(tmp_path):
    first = {p.name: p.read_bytes() for p in schemas.export(tmp_path / "a")}
    second = {p.name: p.read_bytes() for p in schemas.export(tmp_path / "b")}
    assert first == second
    assert all(text.endswith(b"}\n") and b"\n  \"" in text for text in first.values())


@pytest.mark.parametrize("name", sorted(ev.EVENT_TYPES))
def test_every_schema_is_valid_and_names_its_version_and_subject(name):
    schema = committed(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["title"] == name and schema["$id"].endswith(f"/{name}.json")
    assert schema["x-dtf-version"] == ev.CURRENT_VERSION[name]
    assert {"type", "id", "time"} <= set(schema["$defs"][name]["required"])


def test_there_is_a_sample_of_every_event_type():
    assert {type(e) for e in SAMPLES} == set(ev.EVENT_TYPES.values())


@pytest.mark.parametrize("event", SAMPLES, ids=lambda e: type(e).__name__)
def test_every_encoded_event_validates_against_its_schema_and_lands_on_its_subject(event):
    name = type(event).__name__
    validator(name).validate(json.loads(ev.encode(event)))
    template = committed(name)["x-dtf-subject"].replace("{by|coordinator}", "{by}")
    assert template.format(**{f: getattr(event, f) for f in event.__struct_fields__}) == \
        subjects.subject_for(event)


def test_a_submission_written_by_hand_by_a_foreign_client_validates_decodes_and_is_accepted():
    doc = json.loads(FOREIGN_SUBMISSION)
    validator("TaskSubmitted").validate(doc)
    event = ev.decode(FOREIGN_SUBMISSION.encode())
    assert isinstance(event, ev.TaskSubmitted)
    assert event.time == datetime(2025, 6, 1, 8, 0, 0, 250_000, tzinfo=UTC)
    assert event.spec.requirements.hardware == ["cuda", "rocm"] and event.spec.retry_policy.max_retries == 3
    fold = Fold()
    applied = fold.apply("dtf.task.r42.unit-tests-1.submitted.ci-go", 1, FOREIGN_SUBMISSION.encode())
    assert applied.event == event and fold.tasks["unit-tests-1"].status == "pending"


def mutated(change) -> dict:
    doc = json.loads(FOREIGN_SUBMISSION)
    change(doc)
    return doc


@pytest.mark.parametrize("doc", [
    mutated(lambda d: d.pop("spec")),
    mutated(lambda d: d.pop("id")),
    mutated(lambda d: d.pop("time")),
    mutated(lambda d: d.update(time="2025-06-01T10:00:00")),
    mutated(lambda d: d.update(time="yesterday")),
    mutated(lambda d: d["spec"]["requirements"].update(hardware="cuda")),
    mutated(lambda d: d["spec"].update(surprise=1)),
    mutated(lambda d: d["spec"].update(type="multi_device_orchestration")),
    mutated(lambda d: d["spec"].update(timeout_seconds=0)),
    mutated(lambda d: d.update(type="TaskSubmited")),
], ids=["no-spec", "no-id", "no-time", "naive-time", "not-a-time", "v1-hardware-as-v2", "unknown-spec-key",
        "unknown-task-type", "zero-timeout", "misspelt-type"])
def test_what_the_schema_refuses_decode_refuses_too(doc):
    assert not validator("TaskSubmitted").is_valid(doc)
    with pytest.raises(ev.DecodeError):
        ev.decode(json.dumps(doc).encode())
