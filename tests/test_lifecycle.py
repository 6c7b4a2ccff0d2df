"""Services stop when told to, whatever NATS is doing: a worker that cannot reach its server still
ends on SIGTERM, with exit code 0. A command waiting on a run that is interrupted exits 130, having
cancelled the run when asked to."""

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dtf.cli import interrupt
from test_end_to_end import Up

DTF = str(Path(sys.executable).with_name("dtf"))


def a_dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_worker_that_cannot_reach_nats_stops_on_sigterm_with_exit_code_0(tmp_path):
    worker = subprocess.Popen(
        [DTF, "worker", "--nats", f"nats://127.0.0.1:{a_dead_port()}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={"XDG_STATE_HOME": str(tmp_path), "HOME": str(tmp_path)},
    )
    time.sleep(1)  # let it start connecting; not a timing assertion
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(timeout=30) == 0


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
