"""Services outlive their NATS client: when nats-py gives up on a connection for good (its reconnects
ran out while the server was down), each service connects afresh with its back-off and carries on
from its durable consumers; a SIGTERM still stops it at once while it reconnects. Credentials the
server withdraws while a service runs end it with exit code 3, as refused ones at start-up do."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from dtf.streams import auth, bus, topology
from dtf.streams.server import EmbeddedServer

DTF = str(Path(sys.executable).with_name("dtf"))
DEADLINE_S = 120


class Service:
    """A `dtf` service process whose log (stderr) the test reads."""

    def __init__(self, tmp_path: Path, name: str, *args: str, env: dict[str, str] | None = None) -> None:
        self.log = tmp_path / f"{name}.log"
        self.process = subprocess.Popen(
            [DTF, *args], stdout=subprocess.DEVNULL, stderr=self.log.open("w"),
            env={"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state"),
                 "PATH": os.environ["PATH"], **(env or {})},
        )

    def logged(self, text: str, times: int = 1) -> bool:
        return self.log.read_text().count(text) >= times

    async def until_logged(self, text: str, times: int = 1) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not self.logged(text, times):
            assert self.process.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, f"no {text!r} in:\n{self.log.read_text()}"
            await asyncio.sleep(0.2)

    async def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return await asyncio.to_thread(self.process.wait, 30)


def dtf(*args: str, tmp_path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([DTF, *args], capture_output=True, text=True, timeout=DEADLINE_S,
                          env={"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "state"),
                               "PATH": os.environ["PATH"]})


async def provisioned(server: EmbeddedServer, **options) -> None:
    nc = await bus.connect(server.url, name="dtf-tests", **options)
    await topology.provision(nc.jetstream())
    await nc.close()


CLOSED = "closed for good"
QUICKLY = {"DTF_RECONNECT_ATTEMPTS": "2"}  # nats-py gives up after two tries, as it does after 30 in production


async def test_services_whose_client_gave_up_reconnect_after_a_server_restart_and_carry_on(tmp_path):
    server = EmbeddedServer(tmp_path / "nats").start()
    try:
        await provisioned(server)
        url = server.url
        services = {
            "coordinator": Service(tmp_path, "coordinator", "coordinator", "--nats", url, env=QUICKLY),
            "worker": Service(tmp_path, "worker", "worker", "--nats", url, "--id", "w1",
                              "--cache-dir", str(tmp_path / "cache"), env=QUICKLY),
            "projector": Service(tmp_path, "projector", "projector", "--nats", url,
                                 "--db", str(tmp_path / "readmodel.duckdb"), env=QUICKLY),
            "detector": Service(tmp_path, "detector", "detector", "--nats", url, env=QUICKLY),
        }
        for service in services.values():
            await service.until_logged("connected to")
        await services["worker"].until_logged("registered")
        before = dtf("submit", "--command", "true", "--run-id", "before", "--wait", "--nats", url, tmp_path=tmp_path)
        assert before.returncode == 0, before.stderr

        server.stop()  # the same port and store come back below
        for service in services.values():
            await service.until_logged(CLOSED)
        server.start()

        for service in services.values():
            await service.until_logged("connected to", times=2)
        await services["worker"].until_logged("registered", times=2)
        after = dtf("submit", "--command", "true", "--run-id", "after", "--wait", "--json", "--nats", url,
                    tmp_path=tmp_path)
        assert after.returncode == 0, after.stderr
        assert json.loads(after.stdout)["tasks"][0]["worker_id"] == "w1"
        deadline = time.monotonic() + DEADLINE_S  # the projector took up its durable consumer again
        while "after" not in (tasks := dtf("tasks", "--json", "--nats", url, tmp_path=tmp_path)).stdout:
            assert time.monotonic() < deadline, tasks.stderr
            await asyncio.sleep(0.5)
        for name, service in services.items():
            assert await service.stop() == 0, (name, service.log.read_text())
    finally:
        for service in locals().get("services", {}).values():
            if service.process.poll() is None:
                service.process.kill()
        server.stop()


async def test_a_service_reconnecting_to_a_server_that_is_down_stops_on_sigterm_with_exit_code_0(tmp_path):
    with EmbeddedServer(tmp_path / "nats") as server:
        await provisioned(server)
        worker = Service(tmp_path, "worker", "worker", "--nats", server.url, "--cache-dir", str(tmp_path / "cache"),
                         env=QUICKLY)
        await worker.until_logged("registered")
    await worker.until_logged(CLOSED)
    await worker.until_logged("attempt 1 failed")  # in its back-off, waiting for the server to listen
    assert await worker.stop() == 0


async def test_a_worker_whose_credentials_are_revoked_while_it_runs_exits_3(secured_server, tmp_path):
    await provisioned(secured_server.server, **auth.client_options(secured_server.admin, None))
    worker = Service(tmp_path, "worker", "worker", "--nats", secured_server.url,
                     "--creds", str(secured_server.creds("worker", "w1")), "--cache-dir", str(tmp_path / "cache"))
    await worker.until_logged("registered")
    secured_server.registry.revoke("w1", "worker")
    auth.reload([secured_server.server.pid_file])
    assert await asyncio.to_thread(worker.process.wait, 60) == 3
    assert "refused these credentials" in worker.log.read_text().splitlines()[-1]


SERVICE_BREAKING_A_LIMIT = """
import asyncio, sys
from dtf.cli import common

runs = []

async def body(nc, stop):
    runs.append(nc)
    if len(runs) == 1:  # headers beyond max_payload: nats-py lets it through, the server closes the connection
        await nc.publish("dtf.test", b"x" * (nc.max_payload - 16), headers={"Pad": "y" * 64})
        await stop.wait()
    else:
        print("running again on a new connection", file=sys.stderr, flush=True)
        stop.set()

common.setup_logging(False)
common.serve_with_nats(sys.argv[1], None, "dtf-test-service", body)
"""


def test_a_service_whose_connection_the_server_closes_runs_again_on_a_new_one(nats_server):
    done = subprocess.run([sys.executable, "-c", SERVICE_BREAKING_A_LIMIT, nats_server.url],
                          capture_output=True, text=True, timeout=DEADLINE_S)
    assert done.returncode == 0, done.stderr
    assert CLOSED in done.stderr and "maximum payload violation" in done.stderr.lower()
    assert "running again on a new connection" in done.stderr
