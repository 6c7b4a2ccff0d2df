"""Services stop when told to, whatever NATS is doing: a worker that cannot reach its server still
ends on SIGTERM, with exit code 0."""

import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
