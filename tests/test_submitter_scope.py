"""What a submitter's scoped query sees: exactly what it would see in a read model that held only its
own runs; another's run is refused, not silently empty; the fleet without what is not its business."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf import events as ev
from dtf.cli import splitting
from dtf.spec import Requirements
from dtf.state import WorkerState
from dtf.projections import logs, queries, schema
from dtf.streams import auth, bus
from auth_up import dtf_up

T0 = datetime(2026, 1, 1, tzinfo=UTC)
PEOPLE = ("ann", "bob")
PROJECTS = ("web", "ml")
RUNS = ("r1", "r2", "r3", "r4")


@st.composite
def read_models(draw) -> dict[str, list[dict]]:
    """Tasks of a few runs (each run one submitter's), their test results, metrics and detections."""
    owners = {run: draw(st.sampled_from(PEOPLE)) for run in RUNS}
    tasks = []
    for i in range(draw(st.integers(1, 8))):
        run = draw(st.sampled_from(RUNS))
        tasks.append({"task_id": f"{run}-t{i}", "run_id": run, "submitter": owners[run],
                      "project": draw(st.sampled_from(PROJECTS)),
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
                           "time": T0 + timedelta(minutes=i),
                           # its owner's series (the task's submitter), or one from before series had owners
                           "owner": draw(st.sampled_from(["", task["submitter"]]))})
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


def only(tables: dict[str, list[dict]], submitter: str, project: str | None = None) -> dict[str, list[dict]]:
    """The read model as it would be had only `submitter` ever submitted (only its tasks of `project`)."""
    mine = {t["task_id"] for t in tables["tasks"]
            if t["submitter"] == submitter and project in (None, t["project"])}
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
@given(tables=read_models(), who=st.sampled_from(PEOPLE), project=st.sampled_from(PROJECTS))
def test_a_project_narrows_a_submitters_answers_to_its_own_tasks_of_that_project(tables, who, project):
    everyone, alone = database(tables), database(only(tables, who, project))
    for name, request in REQUESTS:
        if name in ("results", "flaky", "aggregate"):
            assert ask(everyone, name, {**request, "project": project}, who) == ask(alone, name, request), name
    narrowed = ask(everyone, "anomalies", {"project": project}, who)["anomalies"]
    assert [row["id"] for row in narrowed] == [row["id"] for row in ask(alone, "anomalies", {})["anomalies"]]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tables=read_models(), who=st.sampled_from(PEOPLE))
def test_a_submitter_sees_the_detections_its_own_results_made_without_anothers_run_or_results(tables, who):
    # A finding of its own series names its results; one of a series shared before series had owners
    # does not (they may be another's). A change run that is not its own is left out either way.
    mine = {t["run_id"] for t in tables["tasks"] if t["submitter"] == who}
    expected = [{**row, "result_ids": row["result_ids"] if row["owner"] == who else [],
                 "change_run_id": row["change_run_id"] if row["change_run_id"] in mine else None}
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


def test_a_split_is_sized_by_the_online_undrained_workers_that_could_run_it():
    cuda = ev.Capabilities(hardware=["cpu", "cuda"])
    workers = [WorkerState(worker_id="a", status="online", concurrency=4, capabilities=cuda),
               WorkerState(worker_id="b", status="online", concurrency=2),
               WorkerState(worker_id="c", status="online", concurrency=8, capabilities=cuda, draining=True),
               WorkerState(worker_id="d", status="lost", concurrency=8, capabilities=cuda)]
    assert splitting.capable_slots(workers, Requirements()) == 6
    assert splitting.capable_slots(workers, Requirements(hardware=["cuda"])) == 4


def test_the_projector_refuses_another_submitters_task_log_and_knows_none_of_an_unknown_one():
    con = database({"tasks": [{"task_id": "t1", "run_id": "r1", "submitter": "bob"}]})
    assert logs.foreign_task(con, "t1", "ann")
    assert not logs.foreign_task(con, "t1", "bob")
    assert not logs.foreign_task(con, "nope", "ann")


# --- end to end: two CI jobs, each with only its submitter credentials ----------------------------


def suite(root: Path, who: str) -> Path:
    """A git project with a test that fails, one that passes, and one that fails with its file's other
    test and passes alone: what `--rerun-failed` runs. One commit, so the rerun's pass makes it flaky."""
    root.mkdir()
    (root / f"test_ok_{who}.py").write_text(f"def test_ok_{who}():\n    assert True\n")
    (root / f"test_bad_{who}.py").write_text(f"def test_bad_{who}():\n    assert 1 == 2, '{who} is broken'\n")
    (root / f"test_flaky_{who}.py").write_text(
        f"def test_together_{who}(request):\n    assert len(request.session.items) == 1, 'fails unless alone'\n\n\n"
        f"def test_other_{who}():\n    assert True\n")
    for args in (["init", "-q", "-b", "main"], ["add", "."],
                 ["-c", "user.name=ci", "-c", "user.email=ci@example.com", "commit", "-q", "-m", "suite"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    return root


async def detect(url: str, admin: str, kind: str, run_id: str, task_id: str) -> None:
    """What the detector would publish for one of the run's results (the same event, the same subject)."""
    nc = await bus.connect(url, "test-detector", **auth.client_options(admin, None))
    try:
        common = dict(id=f"{kind}-{task_id}", time=datetime.now(UTC), run_id=run_id, task_id=task_id,
                      series=f"{task_id}:latency_ms@cpu", benchmark=task_id, metric="latency_ms", hardware=["cpu"],
                      better="lower", size=0.5, confidence=0.99, detector="test")
        event = (ev.RegressionDetected(**common, before=10.0, after=15.0, change_run_id=run_id) if kind == "regression"
                 else ev.AnomalyDetected(**common, value=15.0, expected=10.0, direction="worse"))
        await bus.publish(nc.jetstream(), event)
    finally:
        await nc.close()


def test_two_ci_jobs_each_read_and_report_only_their_own_runs_and_are_refused_the_others(tmp_path):
    suites = {who: suite(tmp_path / f"suite-{who}", who) for who in ("ann", "bob")}
    with dtf_up(tmp_path) as up:
        url, admin, env = up.url, str(up.admin), up.env

        def cli(*args: str, creds: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "dtf", *args, "--nats", url], check=False,
                                  capture_output=True, text=True, env={**env, "DTF_CREDS": creds}, timeout=180,
                                  cwd=tmp_path)

        def as_json(done: subprocess.CompletedProcess) -> dict:
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        creds = {}
        for who in ("ann", "bob"):
            creds[who] = str(tmp_path / f"{who}.creds")
            added = subprocess.run([sys.executable, "-m", "dtf", "creds", "add", "--role", "submitter", "--name", who,
                                    "--out", creds[who]], capture_output=True, text=True, env=env, cwd=tmp_path)
            assert added.returncode == 0, added.stderr
        ann, bob = creds["ann"], creds["bob"]
        for _ in range(100):  # the server reloads its users asynchronously
            if cli("tasks", "--json", creds=bob).returncode == 0:
                break

        # Each job: a run with a failing and a flaky test, the rerun of its failures, a passing run.
        for who in ("ann", "bob"):
            first = cli("submit", str(suites[who]), "--wait", "--run-id", f"run-{who}", creds=creds[who])
            assert first.returncode == 1, first.stderr
            rerun = cli("submit", "--rerun-failed", f"run-{who}", "--run-id", f"rerun-{who}", "--wait", "--json",
                        creds=creds[who])
            assert rerun.returncode == 1, rerun.stderr  # test_bad still fails; test_together passes alone
            assert {t["state"] for t in json.loads(rerun.stdout)["tasks"]} == {"passed", "failed"}
            ok = cli("submit", "--command", "true", "--run-id", f"ok-{who}", "--wait", "--json", creds=creds[who])
            assert ok.returncode == 0, ok.stderr
            (task,) = json.loads(ok.stdout)["tasks"]
            asyncio.run(detect(url, admin, "regression", f"ok-{who}", task["task_id"]))
            asyncio.run(detect(url, admin, "anomaly", f"run-{who}", f"run-{who}-1"))

        # Flaky, anomalies and results: each job's own, and nothing of the other's.
        def eventually(name: str, enough: int) -> list[dict]:
            """The rows once the projector holds them (it follows the log asynchronously)."""
            for _ in range(100):
                found = as_json(cli(name, "--json", creds=ann))[name]
                if len(found) >= enough:
                    break
            return found

        flaky = eventually("flaky", 1)
        assert [row["test"] for row in flaky] == ["test_flaky_ann.py::test_together_ann"]
        found = eventually("anomalies", 2)
        assert {(a["kind"], a["run_id"]) for a in found} == {("regression", "ok-ann"), ("anomaly", "run-ann")}
        rows = as_json(cli("results", "--json", creds=ann))["results"]
        assert {r["run_id"] for r in rows} == {"run-ann", "rerun-ann", "ok-ann"}
        grouped = as_json(cli("results", "--group-by", "test", "--json", creds=ann))["results"]
        assert {row["test"] for row in grouped} == {
            "test_ok_ann.py::test_ok_ann", "test_bad_ann.py::test_bad_ann", "test_flaky_ann.py::test_together_ann",
            "test_flaky_ann.py::test_other_ann", "true"}  # the command task's own result
        csv = cli("results", "--group-by", "run", "--csv", creds=ann)
        assert csv.returncode == 0 and "run-ann" in csv.stdout and "bob" not in csv.stdout, csv.stderr
        runs = as_json(cli("results", "--run", "rerun-ann", "--json", creds=ann))["results"]
        assert {r["nodeid"] for r in runs} == {"test_bad_ann.py::test_bad_ann", "test_flaky_ann.py::test_together_ann"}

        # Reports in every format, and the verdicts CI acts on.
        for fmt, expected in (("md", "ann is broken"), ("json", "test_bad_ann"), ("html", "test_bad_ann"),
                              ("junit", "ann is broken")):
            report = cli("report", "--run", "run-ann", "--format", fmt, creds=ann)
            assert report.returncode == 0 and expected in report.stdout and "bob" not in report.stdout, report.stderr
        latest = cli("report", "--format", "json", creds=ann)  # the latest run: its own
        assert latest.returncode == 0 and json.loads(latest.stdout)["run_id"] == "ok-ann", latest.stderr
        regressed = cli("report", "--run", "ok-ann", "--format", "json", "--fail-on-regression", creds=ann)
        assert regressed.returncode == 4, regressed.stderr
        assert "regression in ok-ann" in regressed.stderr
        assert cli("wait", "ok-ann", "--fail-on-regression", creds=ann).returncode == 4

        # The fleet: whether a capable worker is there and how busy, not where or why.
        (worker,) = as_json(cli("workers", "--json", creds=ann))["workers"]
        assert worker["state"] == "online" and "hardware" in worker["capabilities"]
        assert (worker["host"], worker["pid"], worker["reason"]) == (None, None, None)

        # Everything of bob's, asked by ann: exit 3 and the reason, never bob's data.
        refusals = [
            ("results", "--run", "run-bob", "--json"), ("results", "--run", "run-bob", "--group-by", "test"),
            ("tasks", "--run", "run-bob"), ("anomalies", "--run", "run-bob"),
            *(("report", "--run", "run-bob", "--format", fmt) for fmt in ("md", "json", "html", "junit")),
            ("report", "--run", "ok-bob", "--fail-on-regression"), ("wait", "run-bob"),
            ("wait", "ok-bob", "--fail-on-regression"), ("cancel", "--run", "run-bob"), ("cancel", "run-bob-1"),
            ("submit", "--rerun-failed", "run-bob", "--run-id", "stolen"), ("logs", "run-bob-1"),
        ]
        for args in refusals:
            refused = cli(*args, creds=ann)
            assert refused.returncode == 3, (args, refused.returncode, refused.stderr)
            assert "another submitter's" in refused.stderr and "no projector" not in refused.stderr, args
            assert "bob is broken" not in refused.stdout + refused.stderr, args
        assert cli("tasks", "--run", "stolen", "--json", creds=ann).stdout == '{"tasks": []}\n'
        unknown = cli("report", "--run", "no-such-run", creds=ann)
        assert unknown.returncode == 2 and "no run no-such-run" in unknown.stderr

        # --split auto sizes the split by the fleet the workers query shows it
        split = cli("submit", str(suites["ann"]), "--split", "auto", "--run-id", "split-ann", creds=ann)
        assert split.returncode == 0, split.stderr
        assert "slots" in split.stderr and "no capable worker" not in split.stderr, split.stderr
