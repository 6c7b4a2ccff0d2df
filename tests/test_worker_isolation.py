"""What a task's process starts with (dtf.workers.process.Limits, dtf.workers.environment): resource
limits it cannot raise, an environment without the worker's credentials, a capped log — so what it
prints (and so the ResultReported's output_tail) cannot carry the worker's secrets."""

from __future__ import annotations

import asyncio
import subprocess
import sys

from dtf.workers import process
from dtf.workers.process import Limits, LogSink, run_process
from dtf.workers.runner import run_attempt

from dtf.spec import TaskSpec

PY = sys.executable


async def run_python(tmp_path, code: str, limits: Limits) -> tuple[int | None, str]:
    sink = LogSink(tmp_path / "out.log")
    try:
        result = await run_process([PY, "-c", code], cwd=tmp_path, env={"PATH": "/usr/bin:/bin"}, sink=sink,
                                   timeout=60, cancel=asyncio.Event(), limits=limits)
    finally:
        sink.close()
    return result.exit_code, (tmp_path / "out.log").read_text()


async def test_a_task_cannot_allocate_past_its_memory_limit(tmp_path):
    code = "b = bytearray(768 * 1024 * 1024); print('allocated')"
    limited = await run_python(tmp_path, code, Limits(memory_bytes=512 * 1024 * 1024))
    assert limited[0] != 0 and "MemoryError" in limited[1] and "allocated" not in limited[1]


async def test_a_task_gets_its_open_files_limit_and_cannot_raise_it(tmp_path):
    code = (
        "import resource\n"
        "print(resource.getrlimit(resource.RLIMIT_NOFILE))\n"
        "try:\n"
        "    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))\n"
        "except (ValueError, OSError):\n"
        "    print('raise refused')\n"
    )
    code_, out = await run_python(tmp_path, code, Limits(open_files=64))
    assert code_ == 0 and "(64, 64)" in out and "raise refused" in out


async def test_an_impossible_limit_still_runs_the_task(tmp_path):
    code_, out = await run_python(tmp_path, "print('ran')", Limits(open_files=2**40))
    assert code_ == 0 and "ran" in out


async def test_the_task_environment_holds_none_of_the_workers_credentials(tmp_path, monkeypatch):
    secrets = {"DTF_CREDS": str(tmp_path / "worker.creds"), "NATS_PASSWORD": "nats-pw-123",
               "NATS_USER": "dtf", "MY_API_TOKEN": "tok-456", "AWS_SECRET_ACCESS_KEY": "aws-789",
               "DB_PASSWORD": "db-000"}
    for name, value in secrets.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("HARMLESS_SETTING", "visible")
    spec = TaskSpec(type="command", config={"command": "env"})
    result = await run_attempt(spec, tmp_path, tmp_path / "attempt")
    log = result.log_path.read_text()
    assert result.outcome == "passed" and "HARMLESS_SETTING=visible" in log
    for name, value in secrets.items():
        assert name not in log and value not in log, name
        assert value not in result.output_tail  # what ResultReported would carry into the event log


async def test_a_flood_of_output_is_capped_in_the_log_and_the_tail(tmp_path):
    spec = TaskSpec(type="command", config={"command": f"{PY} -c \"print('x' * 200_000)\""})
    result = await run_attempt(spec, tmp_path, tmp_path / "attempt", max_log_bytes=10_000)
    assert result.log_truncated and result.log_path.stat().st_size < 10_000 + 200
    assert len(result.output_tail.encode()) <= process.TAIL_BYTES


def test_the_worker_sets_its_task_limits_from_its_options(monkeypatch):
    from click.testing import CliRunner

    from dtf.cli import main

    seen = {}

    def fake_serve(*args, **kwargs):
        seen["limits"] = process.task_limits

    monkeypatch.setattr("dtf.cli.commands_run.serve_with_nats", fake_serve)
    monkeypatch.setattr(process, "task_limits", process.DEFAULT_LIMITS)
    done = CliRunner().invoke(main, ["worker", "--id", "w1", "--nats", "nats://127.0.0.1:1",
                                     "--task-max-memory-mb", "300", "--task-max-open-files", "128"])
    assert done.exit_code == 0, done.output
    assert seen["limits"] == Limits(memory_bytes=300 * 1024 * 1024, open_files=128)


def test_a_worker_holding_its_open_files_limit_spawns_without_a_preexec_and_its_task_still_gets_it(tmp_path):
    """Without a preexec_fn Python spawns with vfork (far cheaper for a big worker); the task must get
    the same limits either way. In a child interpreter: holding a limit cannot be undone."""
    script = """
import asyncio, pathlib, sys
from dtf.workers import process
from dtf.workers.process import Limits, LogSink, run_process

limits = Limits(open_files=256)
assert limits.preexec() is not None, "not held yet: the child must set it"
limits.hold_open_files()
assert limits.preexec() is None, "held: inherited"
assert Limits(open_files=256, memory_bytes=2**40).preexec() is not None, "memory is never held"

async def main():
    process.use_pidfd_child_watcher()
    sink = LogSink(pathlib.Path(sys.argv[1]))
    code = "import resource; print(resource.getrlimit(resource.RLIMIT_NOFILE))"
    result = await run_process([sys.executable, "-c", code], cwd=".", env={}, sink=sink, timeout=60,
                               cancel=asyncio.Event(), limits=limits)
    sink.close()
    assert result.exit_code == 0

asyncio.run(main())
"""
    log = tmp_path / "out.log"
    done = subprocess.run([PY, "-c", script, str(log)], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "(256, 256)" in log.read_text()
