"""Services stop when told to, whatever NATS is doing: a worker that cannot reach its server still
ends on SIGTERM with exit code 0, and one whose credentials are refused exits 3. A worker lent with
--exit-when-idle leaves on its own once idle. A command waiting on a run that is interrupted exits
130, having cancelled the run when asked to."""

import asyncio
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtf.cli import interrupt
from dtf.workers import idle
from test_end_to_end import Up

DTF = str(Path(sys.executable).with_name("dtf"))


def a_dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_worker_that_cannot_reach_nats_stops_on_sigterm_with_exit_code_0(tmp_path):
    worker = subprocess.Popen(
        [DTF, "worker", "--nats", f"nats://127.0.0.1:{a_dead_port()}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={"XDG_STATE_HOME": str(tmp_path), "HOME": str(tmp_path)},
    )
    assert any("connecting to" in line for line in worker.stderr)  # what a user sees as it starts
    worker.send_signal(signal.SIGTERM)
    worker.communicate(timeout=30)
    assert worker.returncode == 0


def test_a_service_signalled_while_it_starts_up_still_stops_with_exit_code_0(tmp_path):
    # SIGTERM before the CLI has even finished importing: held from the first line, then honoured.
    worker = subprocess.Popen(
        [DTF, "worker", "--nats", f"nats://127.0.0.1:{a_dead_port()}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        env={"XDG_STATE_HOME": str(tmp_path), "HOME": str(tmp_path), "PYTHONVERBOSE": "1"},
    )
    for line in worker.stderr:  # each import is reported: signal as the slow ones begin, after dtf's first line
        if "/click/__init__" in line:
            break
    worker.send_signal(signal.SIGTERM)
    worker.communicate(timeout=30)
    assert worker.returncode == 0


def started(up, run_id: str) -> bool:
    events = [json.loads(line)["event"] for line in up.dtf("replay", "--json").stdout.splitlines()]
    return any(e["type"] == "TaskStarted" and e["run_id"] == run_id for e in events)


@pytest.mark.slow
def test_ctrl_c_while_waiting_with_cancel_on_interrupt_cancels_the_run_and_exits_130(tmp_path):
    system = Up(tmp_path / "d", tmp_path / "state", workers=1).start()
    try:
        waiting = subprocess.Popen(
            [sys.executable, "-m", "dtf", "submit", "--command", "sleep 60", "--run-id", "interrupted",
             "--wait", "--cancel-on-interrupt"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=system.env, text=True,
        )
        while not started(system, "interrupted"):
            assert waiting.poll() is None, waiting.stderr.read()
            time.sleep(0.2)
        waiting.send_signal(signal.SIGINT)
        assert waiting.wait(timeout=60) == 130
        assert "cancelled 1 of 1 tasks" in waiting.stderr.read()
        settled = system.dtf("wait", "interrupted", "--json", check_json=True)
        assert json.loads(settled.stdout)["tasks"][0]["state"] == "cancelled"
    finally:
        assert system.stop() == 0


def test_an_interrupt_cancels_with_the_flag_asks_at_a_terminal_and_otherwise_leaves_the_run_going():
    assert interrupt.on_interrupt(cancel_on_interrupt=True, interactive=False) == "cancel"
    assert interrupt.on_interrupt(cancel_on_interrupt=True, interactive=True) == "cancel"
    assert interrupt.on_interrupt(cancel_on_interrupt=False, interactive=True) == "ask"
    assert interrupt.on_interrupt(cancel_on_interrupt=False, interactive=False) == "leave"


def test_idleness_is_counted_from_the_end_of_the_last_work_and_ends_the_worker_at_the_limit():
    assert idle.idle_since(None, busy=False, now=5.0) == 5.0
    assert idle.idle_since(5.0, busy=False, now=9.0) == 5.0
    assert idle.idle_since(5.0, busy=True, now=9.0) is None
    assert idle.should_exit(5.0, now=7.0, limit=2.0)
    assert not idle.should_exit(5.0, now=6.9, limit=2.0)
    assert not idle.should_exit(None, now=100.0, limit=2.0)
    assert not idle.should_exit(5.0, now=100.0, limit=None)


@pytest.mark.slow
def test_a_worker_with_exit_when_idle_runs_the_queued_task_then_leaves_with_exit_code_0(tmp_path):
    system = Up(tmp_path / "d", tmp_path / "state", workers=0).start()
    try:
        assert system.dtf("submit", "--command", "true", "--run-id", "lent").returncode == 0
        worker = subprocess.Popen(
            [sys.executable, "-m", "dtf", "worker", "--id", "lent-runner", "--exit-when-idle", "1",
             "--cache-dir", str(tmp_path / "cache")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=system.env,
        )
        assert worker.wait(timeout=120) == 0
        settled = system.dtf("wait", "lent", "--json", check_json=True)
        assert json.loads(settled.stdout)["tasks"][0]["state"] == "passed"
        events = [json.loads(line)["event"] for line in system.dtf("replay", "--json").stdout.splitlines()]
        assert any(e["type"] == "WorkerLeft" and e["worker_id"] == "lent-runner" for e in events)
    finally:
        assert system.stop() == 0


def test_a_worker_whose_credentials_the_server_refuses_exits_3_with_one_line(secured_server, tmp_path):
    from dtf.streams import auth

    stranger = auth.Registry(tmp_path / "elsewhere").ensure("worker", "w9")  # issued by another system
    worker = subprocess.run(
        [DTF, "worker", "--nats", secured_server.url, "--creds", str(stranger), "--id", "w9",
         "--cache-dir", str(tmp_path / "cache")],
        capture_output=True, text=True, timeout=60, env={"XDG_STATE_HOME": str(tmp_path), "HOME": str(tmp_path)},
    )
    assert worker.returncode == 3
    assert "refused these credentials" in worker.stderr.splitlines()[-1]


async def test_a_worker_whose_server_went_away_stops_on_sigterm_with_exit_code_0(tmp_path):
    from dtf.streams import bus, topology
    from dtf.streams.server import EmbeddedServer

    log = tmp_path / "worker.log"
    with EmbeddedServer(tmp_path / "nats") as server:
        nc = await bus.connect(server.url, name="dtf-tests")
        await topology.provision(nc.jetstream())
        await nc.close()
        worker = subprocess.Popen(
            [DTF, "worker", "--nats", server.url, "--cache-dir", str(tmp_path / "cache")],
            stdout=subprocess.DEVNULL, stderr=log.open("w"), env={"HOME": str(tmp_path)},
        )
        while "registered" not in log.read_text():
            assert worker.poll() is None, log.read_text()
            await asyncio.sleep(0.2)
    # The server is gone: leaving cannot be published, and must not be waited for.
    worker.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(worker.wait, 30) == 0
