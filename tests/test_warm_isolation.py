"""A split shard served by a warm pytest process is as far from the worker's credentials as a cold
attempt (`dtf.workers.warm`, `Lease`): under uid isolation (this suite runs as root) the warm
process runs as a task uid of its own, in a copy and a HOME that uid owns, with a credential-free
environment, and when it stops (worker shutdown, a timeout, idleness) no process of that uid is
left, a `setsid` child included. Real pytest children, a real nats-server for the split run.

The task uid must be able to run the worker's Python: this machine's lives under a 0700 /root (so
`--isolate auto` falls back here), so the tests give it a venv of the system's Python of the same
version that reads this environment's site-packages (`task_python`), or skip where there is none.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import psutil
import pytest

from dtf import events as ev
from dtf.spec import TaskSpec
from dtf.workers import sandbox, warm, workspace
from dtf.workers.runner import run_attempt
from tests.test_worker_agent import assign, of, running_agent, submit, wait_for

UIDS = range(20540, 20550)
"""Apart from the other suites' ranges: what is asserted about a uid is about this suite's tasks."""
SAFETY_S = 60.0
"""Only a guard against hanging forever; nothing here asserts on time."""

PROBE = """
    import os, subprocess

    def test_whoami():
        print(f"uid={os.getuid()} gid={os.getgid()} groups={os.getgroups()} pid={os.getpid()} "
              f"home={os.environ['HOME']} tmp={os.environ['TMPDIR']} cwd={os.getcwd()}")

    SECRET = "SECRET_PATH"

    def test_no_credential_in_reach():
        assert os.getuid() != 0
        assert not any(name.startswith(("DTF_CREDS", "NATS_")) for name in os.environ)
        try:
            open(SECRET).read()
        except PermissionError:
            return
        raise AssertionError("read the worker's 0600 creds")

    def test_writes_stay_its_own():
        for where in (os.getcwd(), os.environ["HOME"], os.environ["TMPDIR"]):
            with open(os.path.join(where, "scratch.txt"), "w") as f:
                f.write("mine")

    def test_leaves_a_setsid_child():
        child = subprocess.Popen(["sleep", "300"], start_new_session=True)
        print(f"child={child.pid}")
"""
HANG = """
    import subprocess, sys, time

    def test_hangs():
        child = subprocess.Popen(["sleep", "300"], start_new_session=True)
        print(f"child={child.pid}", flush=True)
        time.sleep(600)
"""


@pytest.fixture(scope="module")
def task_python():
    """A Python the task uids can run, with this environment's pytest and dtf."""
    if os.geteuid() != 0:
        pytest.skip("uid isolation needs a root worker")
    if sandbox.runs_python_as(UIDS.start, sys.executable):
        yield sys.executable
        return
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/local/bin:/usr/bin:/bin")
    if system is None:
        pytest.skip(f"no {version} that other users can run")
    root = Path(tempfile.mkdtemp(prefix="dtf-task-python-"))
    try:
        root.chmod(0o755)
        subprocess.run([system, "-m", "venv", "--without-pip", str(root / "venv")], check=True,
                       capture_output=True, timeout=120)
        [site_dir] = (root / "venv" / "lib").glob("python*/site-packages")
        # addsitedir, not a path line: it runs this environment's .pth files (dtf's editable install)
        import site
        (site_dir / "dtf-under-test.pth").write_text(
            "".join(f"import site; site.addsitedir({d!r})\n" for d in site.getsitepackages()))
        python = str(root / "venv" / "bin" / "python")
        if not sandbox.runs_python_as(UIDS.start, python):
            pytest.skip("this environment's site-packages are closed to other users")
        yield python
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def isolated(monkeypatch, task_python):
    monkeypatch.setattr(sandbox, "sandbox", sandbox.Sandbox(fresh_dir=True, uids=UIDS))
    return sandbox.sandbox


@pytest.fixture
def secret(tmp_path, monkeypatch):
    """The worker's creds: 0600, root's, named in the worker's environment."""
    creds = tmp_path / "worker.creds"
    creds.write_text("-----BEGIN NATS USER JWT----- the-secret")
    creds.chmod(0o600)
    monkeypatch.setenv("DTF_CREDS", str(creds))
    monkeypatch.setenv("NATS_PASSWORD", "pw")
    return creds


@pytest.fixture
def suite(tmp_path, secret):
    root = tmp_path / "suite"
    root.mkdir()
    (root / "test_probe.py").write_text(textwrap.dedent(PROBE.replace("SECRET_PATH", str(secret))))
    (root / "test_hang.py").write_text(textwrap.dedent(HANG))
    return root


def shard(nodeids: list[str], *, timeout: float = 120) -> TaskSpec:
    return TaskSpec(type="test", timeout_seconds=timeout,
                    config={"paths": nodeids, "split": {"suite": ["."]}, "pytest_args": ["-s"]})


def said(output: str, word: str) -> str:
    """The value after `word=` in a probe's output."""
    return output.split(f"{word}=")[1].split()[0]


def living(uid: int) -> list[int]:
    """Processes of `uid` still running (a zombie waits only for a parent to reap it)."""
    return [p.pid for p in psutil.process_iter(["uids", "status"])
            if p.info["uids"] is not None and p.info["uids"].real == uid
            and p.info["status"] != psutil.STATUS_ZOMBIE]


async def settled(condition) -> bool:
    """Whether `condition()` holds within the safety bound (a SIGKILL lands a moment after kill(2))."""
    for _ in range(int(SAFETY_S / 0.05)):
        if condition():
            return True
        await asyncio.sleep(0.05)
    return condition()


async def run(pool: warm.WarmPool, spec: TaskSpec, cwd: Path, name: str, run_id: str = "run-1"):
    attempt_dir = sandbox.sandbox.attempt_dir(cwd.parent, name)  # as `attempt.execute` places it
    try:
        return await run_attempt(spec, cwd, attempt_dir, python=pool.python,
                                 launch=pool.launcher(run_id, spec))
    finally:
        shutil.rmtree(attempt_dir, ignore_errors=True)


async def test_a_warm_process_runs_as_a_task_uid_of_its_own_and_takes_its_processes_when_it_stops(
        isolated, suite, tmp_path, task_python):
    pool = warm.WarmPool(tmp_path / "warm", task_python)
    try:
        cwd = await pool.workspace("run-1", suite, "suite")
        first = await run(pool, shard(["test_probe.py::test_whoami",
                                       "test_probe.py::test_writes_stay_its_own"]), cwd, "w1-a")
        second = await run(pool, shard(["test_probe.py::test_no_credential_in_reach",
                                        "test_probe.py::test_leaves_a_setsid_child"]), cwd, "w1-b")
        assert (first.outcome, second.outcome) == ("passed", "passed"), first.output_tail + second.output_tail
        out = first.output_tail
        [process] = pool.processes  # both shards were served by one warm process
        lease = process.lease
        assert lease is not None and "warm pytest not used" not in out + second.output_tail
        assert int(said(out, "uid")) == int(said(out, "gid")) == lease.uid in UIDS
        assert said(out, "groups") == "[]" and int(said(out, "pid")) == process.proc.pid
        assert said(out, "home") == said(out, "tmp") == str(lease.home)
        assert said(out, "cwd") == str(lease.dir / "suite")  # its own copy, not the run's (a link here)
        assert not (cwd / "scratch.txt").exists() and not (suite / "scratch.txt").exists()
        child = int(said(second.output_tail, "child"))
        assert child in living(lease.uid)  # outside the process group: only the uid's kill reaches it
    finally:
        await pool.close()  # as the worker stops
    assert await settled(lambda: not living(lease.uid))
    assert not lease.dir.exists() and lease.uid not in sandbox.sandbox._held
    assert suite.is_dir() and (suite / "test_probe.py").is_file()  # the link went, not what it named


async def test_a_shard_past_its_timeout_ends_its_process_and_every_process_of_its_uid(
        isolated, suite, tmp_path, task_python):
    pool = warm.WarmPool(tmp_path / "warm", task_python)
    try:
        cwd = await pool.workspace("run-1", suite, "suite")
        assert (await run(pool, shard(["test_probe.py::test_whoami"]), cwd, "t-a")).outcome == "passed"
        [hung] = pool.processes
        result = await run(pool, shard(["test_hang.py::test_hangs"], timeout=3), cwd, "t-b")
        assert result.outcome == "timed_out", result.output_tail
        assert hung not in pool.processes and hung.lease.ended
        assert await settled(lambda: not living(hung.lease.uid))
        assert not hung.lease.dir.exists()
        after = await run(pool, shard(["test_probe.py::test_whoami"]), cwd, "t-c")
        assert after.outcome == "passed" and int(said(after.output_tail, "pid")) != hung.proc.pid
    finally:
        await pool.close()


async def test_a_shard_cut_off_by_the_worker_stopping_leaves_nothing_of_its_uid(
        isolated, suite, tmp_path, task_python):
    """The worker cancels its attempts, then closes the pool (`WorkerAgent.run`)."""
    pool = warm.WarmPool(tmp_path / "warm", task_python)
    cwd = await pool.workspace("run-1", suite, "suite")
    shard_run = asyncio.create_task(run(pool, shard(["test_hang.py::test_hangs"]), cwd, "x-a"))
    try:
        assert await settled(lambda: pool.processes and pool.processes[0].lease is not None)
        [process] = pool.processes
        assert await settled(lambda: len(living(process.lease.uid)) == 2)  # pytest, and its setsid sleep
    finally:
        shard_run.cancel()
        await asyncio.gather(shard_run, return_exceptions=True)
        await pool.close()
    assert await settled(lambda: not living(process.lease.uid))
    assert not process.lease.dir.exists() and process.lease.uid not in sandbox.sandbox._held


async def test_an_idle_process_is_stopped_without_waiting_for_another_shard(
        isolated, suite, tmp_path, task_python):
    pool = warm.WarmPool(tmp_path / "warm", task_python, idle_s=1.0)
    try:
        cwd = await pool.workspace("run-1", suite, "suite")
        result = await run(pool, shard(["test_probe.py::test_leaves_a_setsid_child"]), cwd, "i-a")
        assert result.outcome == "passed", result.output_tail
        [process] = pool.processes
        assert await settled(lambda: not pool.processes)  # no shard came: the pool's own reaper
        assert await settled(lambda: not process.lease.dir.exists())  # the last step of ending the lease
        assert not living(process.lease.uid) and process.lease.uid not in sandbox.sandbox._held
    finally:
        await pool.close()


async def test_a_shard_that_falls_back_to_cold_runs_as_a_task_uid_in_its_own_copy_too(
        isolated, suite, tmp_path, task_python):
    (suite / "conftest.py").write_text(textwrap.dedent("""
        import os

        def pytest_collection_finish(session):
            if "DTF_WARM_TOKEN" in os.environ:
                os._exit(7)
    """))
    pool = warm.WarmPool(tmp_path / "warm", task_python)
    try:
        cwd = await pool.workspace("run-1", suite, "suite")
        result = await run(pool, shard(["test_probe.py::test_whoami",
                                        "test_probe.py::test_no_credential_in_reach",
                                        "test_probe.py::test_writes_stay_its_own"]), cwd, "c-a")
        assert result.outcome == "passed", result.output_tail
        assert "warm pytest not used: it exited (code 7) while collecting" in result.output_tail
        uid = int(said(result.output_tail, "uid"))
        assert uid in UIDS and uid not in sandbox.sandbox._held  # handed back after the shard
        assert said(result.output_tail, "cwd").startswith(str(sandbox.sandbox.base))
        assert not (suite / "scratch.txt").exists() and pool.processes == []
        assert await settled(lambda: not living(uid))
    finally:
        await pool.close()


async def test_without_task_uids_a_warm_process_runs_as_the_worker_in_the_runs_copy(
        monkeypatch, suite, tmp_path):
    """`--isolate auto` where the uid cannot run the Python (or the worker is not root): as before."""
    monkeypatch.setattr(sandbox, "sandbox", sandbox.Sandbox(fresh_dir=True, uids=None))
    pool = warm.WarmPool(tmp_path / "warm", sys.executable)
    try:
        cwd = await pool.workspace("run-1", suite, "suite")
        result = await run(pool, shard(["test_probe.py::test_whoami"]), cwd, "n-a")
        assert result.outcome == "passed", result.output_tail
        assert said(result.output_tail, "uid") == str(os.getuid())
        assert said(result.output_tail, "cwd") == str(cwd)
        assert not cwd.is_symlink() and [p.lease for p in pool.processes] == [None]
    finally:
        await pool.close()


def test_a_working_directory_moves_into_the_copy_only_when_it_lies_in_a_run_workspace(tmp_path):
    run = tmp_path / "warm" / "run-1-x" / "proj"
    dest = tmp_path / "lease"
    assert warm.relocated(run, [run], dest) == (run, dest / "proj")
    deep = run / "sub" / "deep"
    assert warm.relocated(deep, [tmp_path / "other", run], dest) == (run, dest / "proj" / "sub" / "deep")
    assert warm.relocated(run / ".." / "elsewhere", [run], dest) is None  # `config.cwd: ../elsewhere`
    assert warm.relocated(Path("/srv/shared"), [run], dest) is None  # an absolute config.cwd stays as it is
    assert warm.relocated(run.with_name("projects"), [run], dest) is None  # a prefix of it, not under it


async def test_a_split_run_on_an_isolated_worker_is_served_warm_as_a_task_uid_that_dies_with_the_worker(
        isolated, nats_server, js, tmp_path, secret, task_python):
    project = tmp_path / "project"
    project.mkdir()
    (project / "test_probe.py").write_text(textwrap.dedent(PROBE.replace("SECRET_PATH", str(secret))))
    data, ref = await asyncio.to_thread(workspace.pack, project)
    await workspace.upload(js._nc, js, "alice", data, ref)
    shards = {"s1": ["test_probe.py::test_whoami", "test_probe.py::test_no_credential_in_reach"],
              "s2": ["test_probe.py::test_writes_stay_its_own", "test_probe.py::test_leaves_a_setsid_child"]}
    results: dict[str, ev.ResultReported] = {}
    async with running_agent(nats_server, js, tmp_path, python=task_python) as (agent, _):
        for task_id, nodeids in shards.items():  # one at a time: the second finds the first's process idle
            spec = TaskSpec(type="test", workspace=ref, config={
                "paths": nodeids, "split": {"suite": ["."]}, "pytest_args": ["-s"]})
            await submit(js, task_id, spec)
            await assign(js, task_id, spec)
            _, results[task_id] = await wait_for(js, of(ev.ResultReported, task_id))
        [process] = agent.ctx.warm.processes
        lease = process.lease
    out = results["s1"].output_tail
    assert [r.outcome for r in results.values()] == ["passed", "passed"], out + results["s2"].output_tail
    assert "warm pytest not used" not in out + results["s2"].output_tail
    assert int(said(out, "uid")) == lease.uid in UIDS and int(said(out, "pid")) == process.proc.pid
    reported = {t.nodeid for r in results.values() for t in r.tests}
    assert reported == {n for ids in shards.values() for n in ids}
    child = int(said(results["s2"].output_tail, "child"))
    assert await settled(lambda: not living(lease.uid))  # the stopped worker took the setsid child too
    assert not psutil.pid_exists(child) or psutil.Process(child).status() == psutil.STATUS_ZOMBIE
    assert not lease.dir.exists()
