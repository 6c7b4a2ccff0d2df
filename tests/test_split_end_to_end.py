"""`dtf submit --split` on a running system (`dtf up`, two workers): every test runs once, and the
second run of a suite is split better than the first because the first's durations are history."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_end_to_end import EXAMPLES, Up

from dtf import split
from dtf.cli.commands_query import ask
from dtf.cli.common import connected

pytestmark = pytest.mark.slow

SLOW = 6
FAST = 10


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    base = tmp_path_factory.mktemp("split-e2e")
    up = Up(base / "d", base / "state").start()
    yield up
    assert up.stop() == 0


@pytest.fixture
def suite(tmp_path) -> Path:
    root = tmp_path / "suite"
    root.mkdir()
    slow = "\n".join(f"def test_s{i}():\n    time.sleep(0.8)\n" for i in range(SLOW))
    fast = "\n".join(f"def test_f{i}():\n    pass\n" for i in range(FAST))
    (root / "test_slow.py").write_text("import time\n\n" + slow)
    (root / "test_fast.py").write_text(fast)
    return root


async def _results(run_id: str, expected: int) -> list[dict]:
    rows: list[dict] = []
    async with connected(None, None, "split-e2e") as nc:
        for _ in range(200):
            rows = await ask(nc, "results", {"run_id": run_id})
            if len(rows) >= expected:
                break
            await asyncio.sleep(0.1)
    return rows


def results_of(system: Up, run_id: str, expected: int) -> list[dict]:
    """The run's test results once the projector holds all of them, asked as the CLI asks (the
    context `dtf up` wrote: its URL and credentials)."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_STATE_HOME", system.env["XDG_STATE_HOME"])
        env.delenv("DTF_NATS_URL", raising=False)
        return asyncio.run(_results(run_id, expected))


def submit_split(system: Up, *args: str) -> dict:
    done = system.dtf("submit", *args, "--wait", "--json", check_json=True)
    report = json.loads(done.stdout)
    report["stderr"] = done.stderr
    report["returncode"] = done.returncode
    return report


def shard_makespan(report: dict, rows: list[dict], slots: int) -> float:
    """What the shards' recorded durations, pulled in submission order by `slots` workers, add up to."""
    per_task: dict[str, float] = {}
    for row in rows:
        per_task[row["task_id"]] = per_task.get(row["task_id"], 0.0) + row["duration_s"]
    return split.pull_makespan([per_task.get(t["task_id"], 0.0) for t in report["tasks"]], slots)


def test_a_split_suite_reports_every_test_once_and_its_second_run_is_better_balanced(system, suite):
    first = submit_split(system, str(suite), "--split", "2")
    assert first["returncode"] == 0, first["stderr"]
    assert first["summary"] == {"passed": SLOW + FAST, "failed": 0, "skipped": 0, "errors": 0}
    assert "0 with history" in first["stderr"]
    rows = results_of(system, first["run_id"], SLOW + FAST)
    assert sorted(r["nodeid"] for r in rows) == sorted(
        [f"test_slow.py::test_s{i}" for i in range(SLOW)] + [f"test_fast.py::test_f{i}" for i in range(FAST)])

    second = submit_split(system, str(suite), "--split", "2")
    assert second["returncode"] == 0, second["stderr"]
    assert f"{SLOW + FAST} with history" in second["stderr"]
    again = results_of(system, second["run_id"], SLOW + FAST)
    assert len(again) == SLOW + FAST
    assert shard_makespan(second, again, 2) < shard_makespan(first, rows, 2)


def test_a_changed_tree_with_history_is_split_by_file_without_collecting_it(system, tmp_path):
    root = tmp_path / "bigger"
    root.mkdir()
    for i in range(6):
        (root / f"test_f{i}.py").write_text(
            "import time\n\n" + "".join(f"def test_{j}():\n    time.sleep(0.05)\n\n" for j in range(4)))
    first = submit_split(system, str(root), "--split", "2")
    assert first["returncode"] == 0, first["stderr"]
    results_of(system, first["run_id"], 24)  # the history the next split reads
    (root / "test_f0.py").write_text((root / "test_f0.py").read_text() + "\n# a commit later\n")
    (root / "test_new.py").write_text("def test_new():\n    pass\n")
    again = submit_split(system, str(root), "--split", "2")
    assert again["returncode"] == 0, again["stderr"]
    assert "7 test files" in again["stderr"] and "without collecting them" in again["stderr"]
    assert again["summary"] == {"passed": 25, "failed": 0, "skipped": 0, "errors": 0}
    rows = results_of(system, again["run_id"], 25)
    assert len(rows) == len({r["nodeid"] for r in rows}) == 25  # every test once


def test_a_split_run_counts_failures_and_skips_as_an_unsplit_one_does(system):
    report = submit_split(system, str(EXAMPLES / "mixed"), "--split", "auto", "--group", "test")
    assert report["returncode"] == 1, report["stderr"]
    assert report["summary"] == {"passed": 3, "failed": 1, "skipped": 1, "errors": 0}


def test_a_suite_whose_root_is_a_package_is_imported_under_its_own_name(system, tmp_path):
    """pytest imports a package-rooted suite by the root's name (`pkgsuite.test_x`), so the tests may
    import their own package; the worker's copy must keep that name for this to work."""
    root = tmp_path / "pkgsuite"
    root.mkdir()
    (root / "__init__.py").write_text("")
    (root / "helpers.py").write_text("ANSWER = 42\n")
    for i in range(4):
        (root / f"test_m{i}.py").write_text(
            "from pkgsuite.helpers import ANSWER\n\n"
            + "".join(f"def test_{j}():\n    assert ANSWER == 42\n\n" for j in range(3)))
    report = submit_split(system, str(root), "--split", "2", "--group", "file")
    assert report["returncode"] == 0, report["stderr"]
    assert report["summary"] == {"passed": 12, "failed": 0, "skipped": 0, "errors": 0}


def tasks_of(system: Up, run_id: str) -> dict[str, dict]:
    done = system.dtf("tasks", "--run", run_id, "--json")
    return {t["task_id"]: t for t in json.loads(done.stdout)["tasks"]}


def events_of(system: Up, task_id: str) -> list[dict]:
    lines = system.dtf("replay", "--task", task_id, "--json").stdout.splitlines()
    return [json.loads(line) for line in lines]


def test_a_split_suite_with_a_retry_then_a_dependency_chain_with_a_cancel_settles_as_declared(
        system, tmp_path):
    """One flow over both workers: a split suite one of whose shards loses its pytest process once
    (an infrastructure error, retried), a command depending on every shard, a long task depending on
    that one, cancelled while it runs, and a task after it, cancelled for its dependency."""
    root = tmp_path / "flow"
    root.mkdir()
    marker = tmp_path / "died-once"
    (root / "test_dies_once.py").write_text(
        "import os, pathlib\n\n"
        f"def test_survives_a_second_attempt():\n    marker = pathlib.Path({str(marker)!r})\n"
        "    if not marker.exists():\n        marker.touch()\n        os._exit(3)\n")
    for i in range(5):
        (root / f"test_work_{i}.py").write_text(
            "import time\n\n" + "".join(f"def test_{j}():\n    time.sleep(0.3)\n\n" for j in range(3)))
    submitted = system.dtf("submit", str(root), "--split", "2", "--group", "file", "--retries", "1",
                           "--run-id", "flow", "--json", check_json=True)
    shards = json.loads(submitted.stdout)["tasks"]
    assert len(shards) >= 2
    after_suite = system.dtf("submit", "--command", "true", "--run-id", "flow-after", "--json",
                             *(arg for shard in shards for arg in ("--depends-on", shard)), check_json=True)
    [after] = json.loads(after_suite.stdout)["tasks"]
    long = json.loads(system.dtf("submit", "--command", "sleep 600", "--run-id", "flow-long", "--depends-on",
                                 after, "--json", check_json=True).stdout)["tasks"][0]
    last = json.loads(system.dtf("submit", "--command", "true", "--run-id", "flow-last", "--depends-on",
                                 long, "--json", check_json=True).stdout)["tasks"][0]

    suite = json.loads(system.dtf("wait", "flow", "--json", timeout=300).stdout)
    assert suite["summary"] == {"passed": 16, "failed": 0, "skipped": 0, "errors": 0}
    assert sorted(t["attempts"] for t in suite["tasks"]) == [1] * (len(shards) - 1) + [2]
    assert len({t["worker_id"] for t in suite["tasks"]}) == 2  # split across both workers
    for _ in range(600):
        if tasks_of(system, "flow-long")[long]["state"] == "running":
            break
        time.sleep(0.1)
    assert system.dtf("cancel", long).returncode == 0
    assert system.dtf("wait", "flow-after").returncode == 0
    assert system.dtf("wait", "flow-long").returncode != 0
    assert system.dtf("wait", "flow-last").returncode != 0
    assert tasks_of(system, "flow-long")[long]["state"] == "cancelled"
    assert tasks_of(system, "flow-last")[last]["state"] == "cancelled"

    settled = max(e["seq"] for shard in shards for e in events_of(system, shard)
                  if e["event"]["type"] == "ResultReported")
    started = [e["seq"] for e in events_of(system, after) if e["event"]["type"] == "TaskStarted"]
    assert started and started[0] > settled  # the dependency waited for every shard
    long_events = [e["event"] for e in events_of(system, long)]
    assert "TaskStarted" in [e["type"] for e in long_events]  # cancelled while it ran, not before
    assert not any(e["type"] == "ResultReported" and e["outcome"] == "passed" for e in long_events)
    [cancelled] = [e["event"] for e in events_of(system, last) if e["event"]["type"] == "TaskCancelled"]
    assert long in cancelled["reason"]
    assert not any(e["event"]["type"] == "TaskStarted" for e in events_of(system, last))


def test_split_refuses_what_it_cannot_split(system, suite):
    done = system.dtf("submit", "--command", "true", "--split", "2")
    assert done.returncode == 2 and "--split splits test PATHS" in done.stderr
    (suite / "test_broken.py").write_text("import no_such_module\n")
    broken = system.dtf("submit", str(suite), "--split", "2")
    assert broken.returncode == 2 and "collecting the tests to split them failed" in broken.stderr


def test_a_submitter_splits_by_its_own_history_for_the_fleet_the_workers_query_shows(suite, tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    for name in ("DTF_NATS_URL", "DTF_CREDS", "DTF_CA"):
        env.pop(name, None)
    up = subprocess.Popen(  # with auth, unlike the `system` fixture
        [sys.executable, "-m", "dtf", "up", "--workers", "1", "--data-dir", str(tmp_path / "d"),
         "--nats-port", "0", "--no-dashboard"],
        stdout=subprocess.PIPE, stderr=(tmp_path / "up.log").open("ab"), env=env, text=True)
    try:
        url = up.stdout.readline().strip().split("=", 1)[1]

        def dtf(*args: str, **extra: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "dtf", *args], capture_output=True, text=True,
                                  env={**env, **extra}, timeout=120, check=False)

        creds = tmp_path / "sam.creds"
        added = dtf("creds", "add", "--role", "submitter", "--name", "sam", "--out", str(creds))
        assert added.returncode == 0, added.stderr
        as_sam = {"DTF_CREDS": str(creds)}
        for _ in range(300):  # the server loads new credentials, the projector the worker, asynchronously
            fleet = dtf("workers", "--json", "--nats", url, **as_sam)
            if fleet.returncode == 0 and any(w["state"] == "online" for w in json.loads(fleet.stdout)["workers"]):
                break
            time.sleep(0.1)
        auto = dtf("submit", str(suite), "--split", "auto", "--nats", url, **as_sam)
        assert auto.returncode == 0, auto.stderr
        assert re.search(r"shards for [1-9]\d* slots", auto.stderr) and "no capable worker" not in auto.stderr
        named = dtf("submit", str(suite), "--split", "2", "--nats", url, **as_sam)
        assert named.returncode == 0, named.stderr
        assert "0 with history" in named.stderr and "no test history" not in named.stderr
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
