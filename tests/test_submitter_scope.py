"""What a submitter's scoped query sees: exactly what it would see in a read model that held only its
own runs; another's run is refused, not silently empty; the fleet without what is not its business."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf.projections import logs, queries, schema

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PEOPLE = ("ann", "bob")
RUNS = ("r1", "r2", "r3", "r4")


@st.composite
def read_models(draw) -> dict[str, list[dict]]:
    """Tasks of a few runs (each run one submitter's), their test results, metrics and detections."""
    owners = {run: draw(st.sampled_from(PEOPLE)) for run in RUNS}
    tasks = []
    for i in range(draw(st.integers(1, 8))):
        run = draw(st.sampled_from(RUNS))
        tasks.append({"task_id": f"{run}-t{i}", "run_id": run, "submitter": owners[run], "project": owners[run],
                      "type": "test", "status": draw(st.sampled_from(["passed", "failed"])),
                      "commit": draw(st.sampled_from(["c1", "c2"])), "branch": "main", "labels": "{}",
                      "submitted_at": T0 + timedelta(seconds=i)})
    tests, metrics, detections = [], [], []
    for i in range(draw(st.integers(0, 30))):
        task = draw(st.sampled_from(tasks))
        tests.append({"run_id": task["run_id"], "task_id": task["task_id"], "attempt": draw(st.integers(1, 2)),
                      "nodeid": draw(st.sampled_from(["t.py::a", "t.py::b"])), "worker_id": "w1",
                      "outcome": draw(st.sampled_from(["passed", "failed", "error", "skipped"])),
                      "duration_s": float(draw(st.integers(1, 9))), "message": f"m{i}",
                      "time": T0 + timedelta(minutes=i), "hardware": ["cpu"]})
    for i in range(draw(st.integers(0, 6))):
        task = draw(st.sampled_from(tasks))
        metrics.append({"run_id": task["run_id"], "task_id": task["task_id"], "attempt": 1, "worker_id": "w1",
                        "name": "latency_ms", "value": float(draw(st.integers(1, 99))), "labels": "{}",
                        "time": T0 + timedelta(minutes=i), "hardware": ["cpu"]})
    for i in range(draw(st.integers(0, 6))):
        task = draw(st.sampled_from(tasks))
        detections.append({"stream": "DTF_EVENTS", "seq": i + 1, "event_id": f"d{i}", "task_id": task["task_id"],
                           "run_id": task["run_id"], "kind": draw(st.sampled_from(["regression", "anomaly"])),
                           "series": "b:latency_ms@cpu", "labels": "{}", "hardware": ["cpu"], "size": 0.5,
                           "change_run_id": draw(st.sampled_from(RUNS)), "result_ids": [f"result-{i}"],
                           "time": T0 + timedelta(minutes=i)})
    return {"tasks": tasks, "test_results": tests, "metrics": metrics, "detections": detections}


def database(tables: dict[str, list[dict]]) -> duckdb.DuckDBPyConnection:
    con = duckdb.connect()
    schema.create(con)
    for table in schema.TABLES:
        for row in tables.get(table.name, []):
            names = list(row)
            con.execute(f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join('?' * len(names))})",
                        [row[n] for n in names])
    return con


def only(tables: dict[str, list[dict]], submitter: str) -> dict[str, list[dict]]:
    """The read model as it would be had only `submitter` ever submitted."""
    mine = {t["task_id"] for t in tables["tasks"] if t["submitter"] == submitter}
    return {name: [row for row in rows if row["task_id"] in mine] for name, rows in tables.items()}


def ask(con, name: str, request: dict, party: str | None = None) -> dict:
    return json.loads(queries.answer(con, name, json.dumps(request).encode(), party))


REQUESTS = [
    ("tasks", {}), ("results", {}), ("flaky", {}), ("runs", {}),
    ("aggregate", {"group_by": ["test", "hardware", "commit"]}),
    ("aggregate", {"group_by": ["benchmark", "metric", "labels", "hardware"]}),
    ("aggregate", {"group_by": ["run"], "kind": "tests"}),
]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables=read_models(), who=st.sampled_from(PEOPLE))
def test_a_submitters_answers_are_those_of_a_read_model_holding_only_its_runs(tables, who):
    everyone, alone = database(tables), database(only(tables, who))
    for name, request in REQUESTS:
        assert ask(everyone, name, request, who) == ask(alone, name, request), (name, request)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables=read_models(), who=st.sampled_from(PEOPLE))
def test_a_submitter_sees_the_detections_its_own_results_made_without_anothers_run_or_results(tables, who):
    mine = {t["run_id"] for t in tables["tasks"] if t["submitter"] == who}
    expected = [{**row, "result_ids": [], "change_run_id": row["change_run_id"] if row["change_run_id"] in mine else None}
                for row in ask(database(only(tables, who)), "anomalies", {})["anomalies"]]
    assert ask(database(tables), "anomalies", {}, who)["anomalies"] == expected


def test_another_submitters_run_is_refused_and_an_unknown_one_is_empty():
    con = database({"tasks": [{"task_id": "rb-1", "run_id": "rb", "submitter": "bob"}]})
    for name in ("tasks", "results", "aggregate", "anomalies"):
        reply = ask(con, name, {"run_id": "rb"}, "ann")
        assert reply == {"error": "run rb is another submitter's: ann may read only its own runs", "refused": True}
        assert "refused" not in ask(con, name, {"run_id": "rb"}, "bob")
        assert "error" not in ask(con, name, {"run_id": "nobody"}, "ann")
    assert ask(con, "tasks", {"run_id": "rb"})["tasks"][0]["task_id"] == "rb-1"  # an admin or viewer sees all


def test_the_read_models_status_is_refused_to_a_submitter_in_words():
    reply = ask(database({}), "status", {}, "ann")
    assert reply["refused"] is True and "may not ask the status query" in reply["error"]


def test_a_submitter_sees_the_fleets_capabilities_and_load_but_not_its_hosts_or_reasons():
    con = database({"workers": [{"worker_id": "w1", "host": "gpu-7.internal", "pid": 42, "status": "quarantined",
                                 "concurrency": 2, "capabilities": '{"hardware": ["cuda"]}',
                                 "reason": "3 failures in a row, last bob-secret-task"}],
                    "tasks": [{"task_id": "bob-secret-task", "run_id": "rb", "submitter": "bob",
                               "worker_id": "w1", "status": "running"}]})
    (worker,) = ask(con, "workers", {}, "ann")["workers"]
    assert worker["capabilities"] == {"hardware": ["cuda"]} and worker["running"] == 1
    assert (worker["state"], worker["concurrency"]) == ("quarantined", 2)
    assert (worker["host"], worker["pid"], worker["reason"]) == (None, None, None)
    assert "bob-secret-task" not in json.dumps(worker)
    assert ask(con, "workers", {})["workers"][0]["host"] == "gpu-7.internal"


def test_the_projector_refuses_another_submitters_task_log_and_knows_none_of_an_unknown_one():
    con = database({"tasks": [{"task_id": "t1", "run_id": "r1", "submitter": "bob"}]})
    assert logs.foreign_task(con, "t1", "ann")
    assert not logs.foreign_task(con, "t1", "bob")
    assert not logs.foreign_task(con, "nope", "ann")
