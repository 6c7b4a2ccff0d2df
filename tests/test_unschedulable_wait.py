"""A wait on a run that nothing can run ends: once every task left is unschedulable (or waits on one
that is) for --unschedulable-timeout seconds, `dtf submit --wait` and `dtf wait` print each such
task with its reason and exit 5, leaving the run queued. The clock starts again whenever some task
could go on, and 0 waits forever."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtf.cli import unschedulable
from dtf.spec import TaskSpec
from dtf.state import TaskState
from test_end_to_end import Up

STATUSES = ["pending", "unschedulable", "assigned", "running", "passed", "failed", "cancelled"]


def task(task_id: str, status: str, dependencies: tuple[str, ...] = ()) -> TaskState:
    return TaskState(run_id="r", task_id=task_id, status=status, reason=f"why {task_id}" if status == "unschedulable" else "",
                     spec=TaskSpec(type="command", config={"command": "true"}, dependencies=list(dependencies)))


runs = st.lists(st.tuples(st.sampled_from(STATUSES), st.lists(st.integers(0, 7), max_size=2)), min_size=1, max_size=8).map(
    lambda rows: [task(f"t{i}", status, tuple(f"t{d}" for d in deps if d != i)) for i, (status, deps) in enumerate(rows)])

stuck_runs = st.lists(st.sampled_from(["unschedulable", "passed", "failed"]), min_size=1, max_size=6).map(
    lambda statuses: [task("t0", "unschedulable"), *(task(f"t{i + 1}", s) for i, s in enumerate(statuses))])

looks = st.lists(st.tuples(st.floats(0, 100, allow_nan=False), st.booleans()), min_size=1, max_size=20)


def test_a_run_is_stuck_only_when_every_open_task_is_unschedulable_or_waits_on_one_that_is():
    assert [t.task_id for t in unschedulable.stuck([task("a", "unschedulable"), task("b", "passed")])] == ["a"]
    assert unschedulable.stuck([task("a", "unschedulable"), task("b", "running")]) == []
    assert unschedulable.stuck([task("a", "unschedulable"), task("b", "pending")]) == []  # b waits for a free worker
    blocked = [task("a", "unschedulable"), task("b", "pending", ("a",)), task("c", "pending", ("b",))]
    assert [t.task_id for t in unschedulable.stuck(blocked)] == ["a"]
    assert unschedulable.stuck([task("a", "passed")]) == []
    assert unschedulable.stuck([]) == []


@given(runs)
def test_what_is_reported_is_exactly_the_unschedulable_open_tasks_and_never_while_something_runs(tasks):
    reported = unschedulable.stuck(tasks)
    assert all(t.status == "unschedulable" for t in reported)
    if any(t.status in ("assigned", "running") for t in tasks):
        assert reported == []
    if reported:
        assert {t.task_id for t in reported} == {t.task_id for t in tasks if t.status == "unschedulable"}


@given(stuck_runs, st.floats(0.1, 50, allow_nan=False), looks)
def test_a_stuck_run_gives_up_at_the_limit_counted_from_the_last_look_where_something_could_go_on(tasks, limit, looks):
    going = tasks + [task("busy", "running")]
    since, began, now = None, None, 0.0
    for gap, can_go_on in looks:
        now += gap
        since, give_up = unschedulable.step(since, going if can_go_on else tasks, now, limit)
        if can_go_on:
            assert since is None and not give_up  # a task could go on: the clock starts again
            began = None
        else:
            began = now if began is None else began
            assert since == began
            assert give_up == (now - began >= limit)


@given(stuck_runs, looks)
def test_a_limit_of_0_never_gives_up(tasks, looks):
    since, now = None, 0.0
    for gap, _ in looks:
        now += gap
        since, give_up = unschedulable.step(since, tasks, now, 0)
        assert not give_up


def submit(system: Up, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return system.dtf("submit", "--command", "true", *args, timeout=timeout)


@pytest.mark.slow
def test_a_wait_on_a_task_needing_hardware_no_worker_has_ends_with_its_reason_and_exit_5(tmp_path):
    system = Up(tmp_path / "d", tmp_path / "state", workers=1).start()
    try:
        done = submit(system, "--requires", "hardware=cuda", "--run-id", "gpu", "--wait", "--json",
                      "--unschedulable-timeout", "1")
        assert done.returncode == unschedulable.EXIT_UNSCHEDULABLE == 5, done.stderr
        assert "gpu-1 unschedulable: needs hardware cuda; no registered worker has it" in done.stderr
        assert "`dtf cancel --run gpu` cancels it" in done.stderr
        report = json.loads(done.stdout)
        assert report["unschedulable"] == [{"task_id": "gpu-1",
                                            "reason": "needs hardware cuda; no registered worker has it"}]
        # Not cancelled: it is still queued, and `dtf wait` on it ends the same way.
        again = system.dtf("wait", "gpu", "--unschedulable-timeout", "1")
        assert again.returncode == 5 and "needs hardware cuda" in again.stderr
    finally:
        assert system.stop() == 0


@pytest.mark.slow
def test_a_capable_worker_that_joins_while_a_run_waits_takes_its_task_and_the_wait_goes_on(tmp_path):
    system = Up(tmp_path / "d", tmp_path / "state", workers=1).start()
    worker = None
    try:
        # Two tasks no worker can run yet; a worker with rack=b joins and runs the first. The wait
        # does not give up while that runs, and afterwards reports only what is still stuck.
        assert submit(system, "--requires", "rack=b", "--run-id", "racks").returncode == 0
        assert submit(system, "--requires", "rack=c", "--run-id", "racks").returncode == 0
        waiting = subprocess.Popen(
            [sys.executable, "-m", "dtf", "wait", "racks", "--json", "--unschedulable-timeout", "45"],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=system.env, text=True,
        )
        for line in waiting.stderr:
            if "unschedulable, still waiting" in line and "racks-1" in line:
                break
        worker = subprocess.Popen(
            [sys.executable, "-m", "dtf", "worker", "--id", "rack-b", "--capability", "rack=b",
             "--cache-dir", str(tmp_path / "cache")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=system.env,
        )
        out, err = waiting.communicate(timeout=300)
        assert waiting.returncode == 5, err
        report = json.loads(out)
        assert {t["task_id"]: t["state"] for t in report["tasks"]} == {"racks-1": "passed", "racks-2": "unschedulable"}
        assert [t["task_id"] for t in report["unschedulable"]] == ["racks-2"]
        assert "needs tag rack=c" in err
    finally:
        if worker is not None:
            worker.terminate()
            worker.wait(timeout=60)
        assert system.stop() == 0
