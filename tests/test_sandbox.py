"""A task attempt cannot reach the worker's credentials (dtf.workers.sandbox): run through a real
WorkerAgent against a real nats-server with `--isolate on` (this suite runs as root, so each attempt
runs as its own uid), a command task cannot read the worker's creds, finds none in its environment
or its parent's argv, runs in a fresh directory outside the worker's, leaves no process behind, and
cannot change the workspace cache a later run executes."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from dtf import events as ev
from dtf.spec import TaskSpec
from dtf.workers import sandbox, workspace
from tests.test_worker_agent import of, running_agent, submit_and_assign, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="uid isolation needs a root worker")


@pytest.fixture(autouse=True)
def isolated(monkeypatch):
    monkeypatch.setattr(sandbox, "sandbox", sandbox.Sandbox.start("on", range(20100, 20110)))


async def run_command(nats_server, js, tmp_path, cmd: str, task_id: str = "t1", ref=None) -> ev.ResultReported:
    spec = TaskSpec(type="command", config={"command": cmd}, workspace=ref)
    async with running_agent(nats_server, js, tmp_path):
        await submit_and_assign(js, task_id, spec)
        _, result = await wait_for(js, of(ev.ResultReported, task_id))
    return result


async def test_a_command_task_reaches_no_credential_of_the_worker(nats_server, js, tmp_path, monkeypatch):
    creds = tmp_path / "worker.creds"
    creds.write_text("-----BEGIN NATS USER JWT----- the-secret")
    creds.chmod(0o600)
    monkeypatch.setenv("DTF_CREDS", str(creds))
    monkeypatch.setenv("DTF_NATS_URL", "nats://worker:pw@127.0.0.1:4222")
    result = await run_command(nats_server, js, tmp_path, (
        f"cat {creds}; echo \"creds=$DTF_CREDS url=$DTF_NATS_URL\"; echo \"cwd=$(pwd) home=$HOME\"; "
        "echo \"parent=$(tr '\\0' ' ' < /proc/$PPID/cmdline)\"; id -u"))
    out = result.output_tail
    assert "the-secret" not in out and "Permission denied" in out
    assert "creds= url=\n" in out
    assert str(creds) not in out.split("parent=")[1].splitlines()[0]
    cwd = out.split("cwd=")[1].split()[0]
    assert cwd.startswith(str(sandbox.sandbox.base)) and not cwd.startswith(str(tmp_path))
    assert f"home={cwd}" in out
    assert "\n201" in out  # a task uid, not root
    assert not os.path.exists(cwd)  # removed afterwards


def dead(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def test_a_setsid_child_of_a_task_does_not_outlive_the_attempt(nats_server, js, tmp_path):
    result = await run_command(nats_server, js, tmp_path,
                               "setsid nohup sleep 300 >/dev/null 2>&1 & echo child=$!")
    assert result.outcome == "passed", result.output_tail
    pid = int(result.output_tail.split("child=")[1].split()[0])
    for _ in range(600):  # the kill follows the result's publication; a safety bound only
        if dead(pid):
            break
        await asyncio.sleep(0.05)
    assert dead(pid)


async def test_a_task_cannot_change_the_workspace_cache_a_later_run_executes(nats_server, js, tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "step.sh").write_text("echo honest\n")
    data, ref = await asyncio.to_thread(workspace.pack, project)
    await workspace.upload(js._nc, js, "alice", data, ref)
    cached = tmp_path / "cache" / "workspaces" / "w1" / "alice" / ref.sha256
    first = await run_command(nats_server, js, tmp_path,
                              f"echo 'echo evil' > {cached}/step.sh; sh step.sh", "t1", ref)
    assert "honest" in first.output_tail and "evil" not in first.output_tail
    assert stat.S_IMODE(cached.stat().st_mode) == 0o755
    assert stat.S_IMODE((cached / "step.sh").stat().st_mode) == 0o644
    # What a task running as the worker's own user (no root worker) could do: change the cache itself.
    (cached / "step.sh").write_text("echo evil\n")
    second = await run_command(nats_server, js, tmp_path, "sh step.sh", "t2", ref)
    assert "honest" in second.output_tail and "evil" not in second.output_tail


def test_isolation_on_refuses_a_worker_that_cannot_switch_uid():
    with pytest.raises(sandbox.SandboxError):
        sandbox.decide("on", is_root=False)
    assert sandbox.decide("auto", is_root=False) == (True, False)
    assert sandbox.decide("auto", is_root=True) == (True, True)
    assert sandbox.decide("off", is_root=True) == (False, False)


def test_dtf_up_keeps_its_data_dir_private_and_no_creds_path_on_a_workers_argv(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("DTF_NATS_URL", "DTF_CREDS", "DTF_CA")}
    env["XDG_STATE_HOME"] = str(tmp_path / "state")
    data = tmp_path / "d"
    up = subprocess.Popen(
        [sys.executable, "-m", "dtf", "up", "--workers", "1", "--data-dir", str(data), "--nats-port", "0",
         "--no-dashboard", "--isolate", "on"], stdout=subprocess.PIPE, stderr=(tmp_path / "up.log").open("ab"),
        env=env, text=True)
    try:
        up.stdout.readline(), up.stdout.readline()  # the exports: the system is up
        assert stat.S_IMODE(data.stat().st_mode) == 0o700
        assert stat.S_IMODE((data / "logs").stat().st_mode) == 0o700
        worker_creds = sorted(Path(json.loads((data / "context.json").read_text())["auth_dir"]).rglob("*worker*"))
        assert worker_creds
        assert all(stat.S_IMODE(p.stat().st_mode) & 0o077 == 0 for p in worker_creds if p.is_file())
        workers = [p for p in psutil.Process(up.pid).children() if "worker" in p.cmdline()]
        assert workers and not any("creds" in arg for p in workers for arg in p.cmdline())
        cat = " ".join(str(p) for p in worker_creds if p.is_file())
        task = subprocess.run([sys.executable, "-m", "dtf", "submit", "--command", f"cat {cat}", "--wait"],
                              capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path, check=False)
        assert task.returncode != 0 and "exited with code 1" in task.stdout, task.stdout  # cat was refused
    finally:
        up.send_signal(signal.SIGTERM)
        up.wait(60)


def test_two_workers_on_one_machine_never_hold_the_same_task_uid(tmp_path):
    """Else one worker's end-of-attempt kill would take down the other's task."""
    first, second = (sandbox.Sandbox(fresh_dir=True, uids=range(20200, 20202), base=tmp_path) for _ in "ab")
    a, b = first.take_uid(), second.take_uid()
    assert a != b
    with pytest.raises(sandbox.SandboxError):
        first.take_uid()
    second.release_uid(b)
    assert first.take_uid() == b


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can run a process as a task uid")
def test_a_uid_held_by_a_worker_that_died_is_cleaned_before_it_is_handed_out_again(tmp_path):
    """A crashed worker's flock goes with it, but not what its attempt left running as the uid."""
    uids = range(20210, 20211)
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import subprocess, sys, time
        from pathlib import Path
        from dtf.workers import sandbox
        box = sandbox.Sandbox(fresh_dir=True, uids=range({uids.start}, {uids.stop}), base=Path({str(tmp_path)!r}))
        uid = box.take_uid()
        left = subprocess.Popen(["sleep", "300"], user=uid, group=uid, extra_groups=[], start_new_session=True)
        print(left.pid, flush=True)
        time.sleep(300)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        left_behind = int(holder.stdout.readline())
        holder.kill()  # the worker dies holding the uid; its attempt's process lives on
        holder.wait(30)
        assert psutil.pid_exists(left_behind) and psutil.Process(left_behind).status() != psutil.STATUS_ZOMBIE
        box = sandbox.Sandbox(fresh_dir=True, uids=uids, base=tmp_path)
        assert box.take_uid() == uids.start
        for _ in range(300):  # a bound, not a timing: the kill was sent before take_uid returned
            if gone(left_behind):
                break
            time.sleep(0.1)
        assert gone(left_behind)
        box.release_uid(uids.start)
        assert box.take_uid() == uids.start  # released cleanly: taken again without a kill to do
    finally:
        holder.kill()
        sandbox.kill_all_of(uids.start)  # the leftover, should the worker's cleaning have failed
