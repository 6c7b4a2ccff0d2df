"""The whole system as a user runs it: `dtf up` in the background (real nats-server, coordinator,
projector, workers as separate processes), then `dtf` commands against it."""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from nats.errors import NoRespondersError

from dtf import subjects
from dtf.projections.rebuild import tables_equal
from dtf.streams import bus, topology

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Up:
    """A `dtf up` process on its own data dir and port; commands run against its context."""

    def __init__(self, data_dir: Path, state_dir: Path, workers: int = 2) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, "XDG_STATE_HOME": str(state_dir)}
        self.env.pop("DTF_NATS_URL", None)
        self.port = free_port()
        self.workers = workers
        self.process: subprocess.Popen | None = None
        self.url = ""

    def start(self) -> Up:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dtf", "up", "--workers", str(self.workers), "--data-dir", str(self.data_dir),
             "--nats-port", str(self.port), "--no-dashboard", "--no-auth"],  # auth: tests/test_auth.py
            stdout=subprocess.PIPE, stderr=open(self.data_dir.parent / f"up-{self.port}.log", "ab"),
            env=self.env, text=True,
        )
        line = self.process.stdout.readline()
        assert line.startswith("export DTF_NATS_URL="), f"dtf up printed {line!r}"
        self.url = line.strip().split("=", 1)[1]
        return self

    def stop(self) -> int:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def dtf(self, *args: str, check_json: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a dtf command that finds the server through the current context, as a user's would."""
        done = subprocess.run([sys.executable, "-m", "dtf", *args], capture_output=True, text=True,
                              env=self.env, timeout=timeout, cwd=ROOT)
        if check_json:
            assert done.stdout.strip(), done.stderr
        return done


@pytest.fixture
def up(tmp_path):
    system = Up(tmp_path / "d", tmp_path / "state").start()
    yield system
    if system.process.poll() is None:
        assert system.stop() == 0


def test_a_suite_with_a_failure_reports_exactly_its_counts_and_exits_1(up):
    done = up.dtf("submit", str(EXAMPLES / "mixed"), "--wait", "--json", check_json=True)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["summary"] == {"passed": 3, "failed": 1, "skipped": 1, "errors": 0}
    [task] = report["tasks"]
    assert task["state"] == "failed" and task["attempts"] == 1 and task["worker_id"]


def test_command_tasks_exit_with_their_outcome(up):
    assert up.dtf("submit", "--command", "true", "--wait").returncode == 0
    done = up.dtf("submit", "--command", "false", "--wait", "--json", check_json=True)
    assert done.returncode == 1
    assert json.loads(done.stdout)["tasks"][0]["state"] == "failed"


def test_replay_shows_a_task_timeline_in_stream_order(up):
    done = up.dtf("submit", "--command", "echo hello", "--wait", "--json", check_json=True)
    task_id = json.loads(done.stdout)["tasks"][0]["task_id"]
    lines = [json.loads(x) for x in up.dtf("replay", "--task", task_id, "--json").stdout.splitlines()]
    assert [x["event"]["type"] for x in lines] == ["TaskSubmitted", "TaskAssigned", "TaskStarted", "ResultReported"]
    assert [x["seq"] for x in lines] == sorted(x["seq"] for x in lines)
    assert "hello" in up.dtf("logs", task_id).stdout


def test_the_read_model_answers_while_the_projector_owns_it(up):
    done = up.dtf("submit", str(EXAMPLES / "mixed"), "--wait", "--json", check_json=True)
    run_id = json.loads(done.stdout)["run_id"]
    tasks = json.loads(up.dtf("tasks", "--run", run_id, "--json").stdout)["tasks"]
    assert [t["state"] for t in tasks] == ["failed"]
    results = json.loads(up.dtf("results", "--run", run_id, "--json").stdout)["results"]
    assert sorted(r["outcome"] for r in results) == ["failed", "passed", "passed", "passed", "skipped"]
    workers = json.loads(up.dtf("workers", "--json").stdout)["workers"]
    assert len(workers) == 2 and all(w["state"] == "online" for w in workers)


async def projector_caught_up(url: str) -> bool:
    nc = await bus.connect(url, name="test")
    try:
        js = nc.jetstream()
        tails = {s: (await js.stream_info(s)).state.last_seq for s in (topology.EVENTS, topology.HEARTBEATS)}
        try:
            reply = json.loads((await nc.request(subjects.query("status"), b"{}", timeout=10)).data)
        except NoRespondersError:
            return False  # the projector is still starting
        return all(reply["checkpoints"].get(s, 0) >= seq for s, seq in tails.items())
    finally:
        await nc.close()


def test_a_rebuilt_read_model_equals_the_live_one(tmp_path):
    first = Up(tmp_path / "d", tmp_path / "state").start()
    first.dtf("submit", str(EXAMPLES / "mixed"), "--wait")
    first.dtf("submit", "--command", "exit 3", "--wait")
    assert first.stop() == 0  # the workers leave: their WorkerLeft events are the last ones
    quiet = Up(tmp_path / "d", tmp_path / "state", workers=0).start()
    try:
        while not asyncio.run(projector_caught_up(quiet.url)):
            time.sleep(0.2)
        rebuilt = tmp_path / "rebuilt.duckdb"
        assert quiet.dtf("replay", "--db", str(rebuilt)).returncode == 0
    finally:
        assert quiet.stop() == 0
    assert tables_equal(quiet.data_dir / "readmodel.duckdb", rebuilt) == []


def raw_publish(url: str, subject: str, payload: bytes, msg_id: str | None = None) -> None:
    """A client that is not nats-py: the NATS text protocol over a plain socket."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.recv(4096)  # INFO
        sock.sendall(b'CONNECT {"verbose":false,"pedantic":false,"headers":true,"lang":"raw"}\r\n')
        if msg_id is None:
            sock.sendall(b"PUB %s %d\r\n%s\r\n" % (subject.encode(), len(payload), payload))
        else:
            headers = b"NATS/1.0\r\nNats-Msg-Id: %s\r\n\r\n" % msg_id.encode()
            sock.sendall(b"HPUB %s %d %d\r\n%s%s\r\n" % (
                subject.encode(), len(headers), len(headers) + len(payload), headers, payload))
        sock.sendall(b"PING\r\n")
        assert b"PONG" in sock.recv(4096)


def test_a_task_published_by_a_foreign_client_runs_and_garbage_is_rejected(up):
    raw_publish(up.url, "dtf.task.foreign-run.junk.submitted.someone", b"{not json")
    submitted = {
        "type": "TaskSubmitted", "id": "foreign-1", "time": "2026-01-01T00:00:00Z", "v": 2,
        "run_id": "foreign-run", "task_id": "foreign-1", "submitter": "someone",
        "spec": {"type": "command", "config": {"command": "echo from afar"}},
    }
    raw_publish(up.url, "dtf.task.foreign-run.foreign-1.submitted.someone",
                json.dumps(submitted).encode(), msg_id="foreign-1")
    done = up.dtf("wait", "foreign-run", "--json", check_json=True)
    report = json.loads(done.stdout)
    states = {t["task_id"]: t["state"] for t in report["tasks"]}
    assert states == {"foreign-1": "passed", "junk": "rejected"}
    assert done.returncode == 1  # the run holds a rejected submission
    rejected = [json.loads(x) for x in up.dtf("replay", "--task", "junk", "--json").stdout.splitlines()]
    assert rejected[-1]["event"]["type"] == "TaskRejected"
    assert rejected[-1]["event"]["raw"] == "{not json"
    assert up.dtf("submit", "--command", "true", "--wait").returncode == 0


def test_sigterm_stops_everything_and_a_restart_finishes_queued_work(tmp_path):
    first = Up(tmp_path / "d", tmp_path / "state", workers=0).start()
    done = first.dtf("submit", "--command", "true", "--json", check_json=True)
    run_id = json.loads(done.stdout)["run_id"]
    assert first.stop() == 0
    second = Up(tmp_path / "d", tmp_path / "state", workers=1).start()
    try:
        assert second.dtf("wait", run_id).returncode == 0
    finally:
        assert second.stop() == 0


def test_bad_flags_and_specs_get_one_line_errors_and_exit_2(up, tmp_path):
    assert up.dtf("submit", "--command", "true", "--requires", "hardware=quantum").returncode == 2
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": "test", "config": {}}')
    done = up.dtf("submit", "--spec", str(bad))
    assert done.returncode == 2 and "config.paths" in done.stderr
    unreachable = up.dtf("tasks", "--nats", f"nats://127.0.0.1:{free_port()}")
    assert unreachable.returncode == 2 and "cannot reach NATS" in unreachable.stderr


def test_cancelling_a_run_kills_its_running_task_and_settles_the_run(up):
    done = up.dtf("submit", "--command", "sleep 60", "--json", check_json=True)
    report = json.loads(done.stdout)
    task_id = report["tasks"][0]
    while "TaskStarted" not in up.dtf("replay", "--task", task_id).stdout:
        time.sleep(0.2)
    assert up.dtf("cancel", "--run", report["run_id"]).returncode == 0
    waited = up.dtf("wait", report["run_id"], "--json", check_json=True)
    assert waited.returncode == 1
    assert json.loads(waited.stdout)["tasks"][0]["state"] == "cancelled"
    history = [json.loads(x)["event"] for x in up.dtf("replay", "--task", task_id, "--json").stdout.splitlines()]
    assert history[-1]["type"] == "ResultReported" and history[-1]["outcome"] == "cancelled"


def test_a_task_on_a_sigkilled_worker_is_reassigned_and_finishes_once(tmp_path):
    system = Up(tmp_path / "d", tmp_path / "state", workers=0).start()
    logs = (tmp_path / "procs.log").open("ab")

    def spawn(*args: str) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "dtf", *args, "--nats", system.url],
                                stdout=logs, stderr=logs, env=system.env)

    # A second coordinator replica with a short heartbeat timeout, beside `dtf up`'s own.
    fast = spawn("coordinator", "--heartbeat-timeout", "1")
    doomed = spawn("worker", "--id", "doomed", "--heartbeat-interval", "0.2", "--cache-dir", str(tmp_path / "c1"))
    survivor = None
    try:
        done = system.dtf("submit", "--command", "sleep 5; echo finished", "--json", check_json=True)
        report = json.loads(done.stdout)
        task_id = report["tasks"][0]
        while "TaskStarted" not in system.dtf("replay", "--task", task_id).stdout:
            time.sleep(0.2)
        survivor = spawn("worker", "--id", "survivor", "--heartbeat-interval", "0.2",
                         "--cache-dir", str(tmp_path / "c2"))
        doomed.kill()
        waited = system.dtf("wait", report["run_id"], "--json", check_json=True)
        assert waited.returncode == 0, waited.stderr
        [task] = json.loads(waited.stdout)["tasks"]
        assert (task["state"], task["attempts"], task["worker_id"]) == ("passed", 2, "survivor")
        history = [json.loads(x)["event"] for x in
                   system.dtf("replay", "--json").stdout.splitlines()]
        lost = [e for e in history if e["type"] == "WorkerLost"]
        assert [e["worker_id"] for e in lost] == ["doomed"]
        outcomes = [e for e in history if e["type"] in ("ResultReported", "TaskFailed") and e.get("task_id") == task_id]
        assert [(e["type"], e["attempt"]) for e in outcomes] == [("TaskFailed", 1), ("ResultReported", 2)]
        # The task's own timeline shows the lost attempt and its reassignment; `workers` says why.
        timeline = [(e["type"], e.get("attempt"), e.get("worker_id"), e.get("category"))
                    for e in (x["event"] for x in replay_events(system, task_id)) if e["type"] != "TaskStarted"]
        assert timeline == [("TaskSubmitted", None, None, None), ("TaskAssigned", 1, "doomed", None),
                            ("TaskFailed", 1, "doomed", "worker"), ("TaskAssigned", 2, "survivor", None),
                            ("ResultReported", 2, "survivor", None)]
        while not any(w["worker_id"] == "doomed" and w["state"] == "lost"
                      for w in json.loads(system.dtf("workers", "--json").stdout)["workers"]):
            time.sleep(0.2)  # the projector folds the verdict a moment after `wait` saw the result
        [doomed_row] = [w for w in json.loads(system.dtf("workers", "--json").stdout)["workers"]
                        if w["worker_id"] == "doomed"]
        assert "no heartbeat" in doomed_row["reason"]
    finally:
        for process in (fast, doomed, survivor):
            if process is not None and process.poll() is None:
                process.terminate()
                process.wait(30)
        assert system.stop() == 0


def test_a_drained_worker_shows_as_draining_and_gets_no_new_work(up, tmp_path):
    while len(workers := json.loads(up.dtf("workers", "--json").stdout)["workers"]) < 2:
        time.sleep(0.2)  # both workers register a moment after `dtf up` is ready
    drained, other = workers[0]["worker_id"], workers[1]["worker_id"]
    assert up.dtf("worker", "drain", drained, "--reason", "maintenance").returncode == 0
    while not next(w for w in json.loads(up.dtf("workers", "--json").stdout)["workers"]
                   if w["worker_id"] == drained)["draining"]:
        time.sleep(0.2)
    spec = tmp_path / "four.json"
    spec.write_text(json.dumps([{"type": "command", "config": {"command": "true"}}] * 4))
    done = up.dtf("submit", "--spec", str(spec), "--wait", "--json", check_json=True)
    tasks = json.loads(done.stdout)["tasks"]
    assert len(tasks) == 4 and {t["worker_id"] for t in tasks} == {other}
    assert up.dtf("worker", "drain", "nobody-here").returncode == 2


def test_arguments_after_the_double_dash_go_to_pytest(up):
    done = up.dtf("submit", str(EXAMPLES / "mixed"), "--wait", "--json", "--", "-k", "one or two",
                  check_json=True)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["summary"] == {"passed": 2, "failed": 0, "skipped": 0, "errors": 0}


def test_logs_follow_streams_a_running_task_and_replay_stops_at_a_sequence(up):
    done = up.dtf("submit", "--command", "for i in 1 2 3 4 5; do echo line-$i; sleep 0.4; done", "--json",
                  check_json=True)
    task_id = json.loads(done.stdout)["tasks"][0]
    while "TaskStarted" not in up.dtf("replay", "--task", task_id).stdout:
        time.sleep(0.1)
    followed = up.dtf("logs", task_id, "--follow")
    assert followed.returncode == 0 and "line-5" in followed.stdout
    assert "line-1" in up.dtf("logs", task_id).stdout
    lines = up.dtf("replay", "--upto-seq", "2", "--json").stdout.splitlines()
    assert [json.loads(x)["seq"] for x in lines] == [1, 2]


def replay_events(up, task_id: str) -> list[dict]:
    return [json.loads(x) for x in up.dtf("replay", "--task", task_id, "--json").stdout.splitlines()]


def test_an_unschedulable_task_is_reported_once_and_wait_timeout_exits_1_with_the_reason(up):
    assert up.dtf("submit", "--command", "true", "--wait").returncode == 0  # the workers have registered
    done = up.dtf("submit", "--command", "true", "--requires", "hardware=cuda|rocm", "--wait", "--wait-timeout", "4",
                  "--json", check_json=True)
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    [task] = report["tasks"]
    reason = "needs hardware cuda|rocm; no registered worker has it"
    assert task["state"] == "unschedulable" and task["reason"] == reason
    assert report["gave_up_after_s"] == 4 and report["unsettled"] == [f"{task['task_id']} unschedulable: {reason}"]
    assert done.stderr.count("dtf: unschedulable, still waiting") == 1 and "gave up waiting after 4s" in done.stderr
    waited = up.dtf("wait", report["run_id"], "--wait-timeout", "1", "--json", check_json=True)
    assert waited.returncode == 1 and json.loads(waited.stdout)["unsettled"] == report["unsettled"]
    kinds = [x["event"]["type"] for x in replay_events(up, task["task_id"])]
    assert kinds == ["TaskSubmitted", "TaskUnschedulable"]
    assert up.dtf("cancel", "--run", report["run_id"]).returncode == 0


def test_depends_on_orders_tasks_a_cycle_is_rejected_and_a_missed_deadline_is_recorded(up):
    first = json.loads(up.dtf("submit", "--command", "sleep 1", "--json", check_json=True).stdout)["tasks"][0]
    done = up.dtf("submit", "--command", "sleep 3", "--depends-on", first, "--deadline", "2s", "--wait", "--json",
                  check_json=True)
    assert done.returncode == 0, done.stderr
    [task] = json.loads(done.stdout)["tasks"]
    assert "missed its deadline" in task["reason"] and "missed its deadline" in done.stderr
    finished = next(x["seq"] for x in replay_events(up, first) if x["event"]["type"] == "ResultReported")
    history = replay_events(up, task["task_id"])
    assigned = next(x["seq"] for x in history if x["event"]["type"] == "TaskAssigned")
    assert assigned > finished
    assert [x["event"]["status"] for x in history if x["event"]["type"] == "TaskDeadlineMissed"] in (
        ["pending"], ["assigned"], ["running"])
    loop = up.dtf("submit", "--command", "true", "--run-id", "loop", "--depends-on", "loop-1", "--wait", "--json",
                  check_json=True)
    assert loop.returncode == 1
    [rejected] = json.loads(loop.stdout)["tasks"]
    assert (rejected["state"], rejected["reason"]) == ("rejected", "dependency cycle: loop-1 -> loop-1")


def test_rerun_failed_runs_again_only_the_failed_test(up):
    done = up.dtf("submit", str(EXAMPLES / "mixed"), "--wait", "--json", check_json=True)
    assert done.returncode == 1
    run_id = json.loads(done.stdout)["run_id"]
    again = up.dtf("submit", "--rerun-failed", run_id, "--wait", "--json", check_json=True)
    assert again.returncode == 1, again.stderr
    report = json.loads(again.stdout)
    assert report["run_id"] != run_id
    assert report["summary"] == {"passed": 0, "failed": 1, "skipped": 0, "errors": 0}
    assert report["tasks"][0]["name"] == "examples/mixed/test_mixed.py"  # as run from the dtf checkout, its project
    ok = up.dtf("submit", "--command", "true", "--wait", "--json", check_json=True)
    nothing = up.dtf("submit", "--rerun-failed", json.loads(ok.stdout)["run_id"])
    assert nothing.returncode == 0 and "nothing to rerun" in nothing.stderr


def test_the_newcomers_demo_runs_the_example_suite_and_exits_0(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("DTF_NATS_URL", None)
    done = subprocess.run([sys.executable, "-m", "dtf", "demo"], capture_output=True, text=True, env=env,
                          timeout=180, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "11 passed, 0 failed, 1 skipped, 0 errors" in done.stdout
    assert not (tmp_path / "state" / "dtf" / "current.json").exists()  # it leaves no context behind


def test_a_benchmark_whose_metric_jumps_20_percent_at_run_20_brings_one_regression(tmp_path):
    """Thirty real benchmark tasks through `dtf up` (one worker, one slot: they run and report in
    order), the detector `dtf up` starts, then `dtf anomalies` and `dtf replay`."""
    system = Up(tmp_path / "d", tmp_path / "state", workers=1).start()
    try:
        noise = random.Random(30)
        latencies = [100.0 * (1.2 if n >= 20 else 1.0) * (1 + noise.gauss(0, 0.01)) for n in range(30)]
        write = "import json, os; json.dump({{'latency_ms': {v:.3f}}}, open(os.environ['DTF_METRICS'], 'w'))"
        specs = [{"type": "benchmark", "name": "e2e-bench",
                  "config": {"command": f'{sys.executable} -c "{write.format(v=v)}"', "model": "e2e"}}
                 for v in latencies]
        (tmp_path / "bench.json").write_text(json.dumps(specs))
        done = system.dtf("submit", "--spec", str(tmp_path / "bench.json"), "--wait", "--json", check_json=True)
        assert done.returncode == 0, done.stderr
        run_id = json.loads(done.stdout)["run_id"]
        found: list[dict] = []
        for _ in range(300):  # a bound on the loop: the detector reads the results a moment later
            found = json.loads(system.dtf("anomalies", "--json").stdout)["anomalies"]
            if found:
                break
            time.sleep(0.2)
        time.sleep(2)  # anything it would add after the first finding comes within its next read
        found = json.loads(system.dtf("anomalies", "--json").stdout)["anomalies"]
        assert [(a["kind"], a["series"], a["run_id"]) for a in found] == [
            ("regression", f"e2e-bench:latency_ms{{cwd={ROOT},model=e2e}}@cpu", run_id)]  # submit adds cwd
        replayed = [json.loads(x)["event"]["type"] for x in system.dtf("replay", "--json").stdout.splitlines()]
        assert replayed.count("RegressionDetected") == 1
    finally:
        assert system.stop() == 0
