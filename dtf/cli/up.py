"""`dtf up`: a whole local system from one command — the embedded nats-server with JetStream under the
data dir, the streams provisioned, then a coordinator, the projector, the detector and N workers as child processes
of this one (each its own `dtf ...` command, exactly as on separate machines). It writes the context
that lets every other command find the server, restarts a child that crashes, and on SIGINT/SIGTERM
stops the workers first (so they hand back unfinished work while NATS is still up), then the rest."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path

from dtf.cli.common import current_context_file
from dtf.streams import auth, bus, tls, topology
from dtf.streams.cluster import Cluster, free_port
from dtf.streams.server import EmbeddedServer

log = logging.getLogger("dtf.up")

STOP_GRACE_S = 20.0
RESTART_LIMIT = 5


@dataclass
class Child:
    name: str
    args: list[str]
    log_path: Path
    env: dict[str, str] = field(default_factory=dict)
    """Its credentials go here (DTF_CREDS), not on its argv, where any process can read them."""
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0


@dataclass
class System:
    data_dir: Path
    workers: int = 2
    isolate: str = "auto"
    """Each worker's `--isolate`."""
    start_deadline: float | None = None
    """The coordinator's `--start-deadline` (None: its default)."""
    nats_port: int = 4222
    listen: str = "127.0.0.1"
    dashboard_url: str | None = None
    dashboard_port: int | None = None
    """Serve the dashboard (`dtf dashboard`, as a read-only viewer) on this port, 0 a free one; None: none."""
    cluster: int = 1
    """nats-server nodes: 1 (EmbeddedServer, R1 streams) or 3 (a loopback Cluster, R3 streams)."""
    metrics_port: int | None = None
    """Prometheus /metrics for every child: the coordinator on this port, the projector on the next,
    then the workers; 0 gives each a free port. None: no metrics."""
    auth: bool = True
    """Users and permissions per role (streams/auth.py); each child gets its own credentials."""
    tls: bool = False
    tls_cert: Path | None = None
    tls_key: Path | None = None
    """--tls with a given certificate (its CA in tls_ca); without them a throwaway CA is made."""
    tls_ca: Path | None = None
    server: EmbeddedServer | None = None
    nats_cluster: Cluster | None = None
    children: list[Child] = field(default_factory=list)
    _watchers: list[asyncio.Task] = field(default_factory=list)
    _metrics_ports: dict[str, int] = field(default_factory=dict)
    tls_files: tls.TlsFiles | None = None

    @property
    def url(self) -> str:
        if self.nats_cluster is not None:
            url = self.nats_cluster.url  # every node, comma-separated: clients fail over between them
        else:
            assert self.server is not None
            url = self.server.url
        return url.replace("nats://", "tls://") if self.tls_files is not None else url

    @property
    def registry(self) -> auth.Registry:
        return auth.Registry(self.data_dir / "auth")

    @property
    def admin_creds(self) -> Path | None:
        return self.registry.ensure("admin", "admin") if self.auth else None

    @property
    def ca(self) -> Path | None:
        return self.tls_files.ca if self.tls_files is not None else None

    def _security_config(self, config_dir: Path) -> str:
        """The authorization and TLS blocks of a node's config (users.conf is included, so a new user
        only needs a reload)."""
        text = auth.authorization_block(self.registry.conf, config_dir) if self.auth else ""
        return text + (tls.tls_block(self.tls_files) if self.tls_files is not None else "")

    def _prepare_security(self) -> None:
        if self.auth:
            self.registry.refresh()
        if self.tls:
            if self.tls_cert is not None and self.tls_key is not None and self.tls_ca is not None:
                self.tls_files = tls.TlsFiles(self.tls_cert, self.tls_key, self.tls_ca)
            else:
                self.tls_files = tls.ensure_local(self.data_dir / "tls", tls.listen_hosts(self.listen))

    @property
    def pid_files(self) -> list[Path]:
        servers = self.nats_cluster.nodes if self.nats_cluster is not None else [self.server]
        return [s.pid_file for s in servers if s is not None]

    async def start(self) -> None:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # The read model, logs, creds and context are the worker's (and its user's) alone: a task run
        # as another uid must not even list them.
        self.data_dir.chmod(0o700)
        await asyncio.to_thread(self._prepare_security)
        # Before the server starts: every child's user is in the users.conf it loads.
        (self.data_dir / "logs").mkdir(mode=0o700, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        self.children = [
            self._child("coordinator", ["coordinator", *(
                [] if self.start_deadline is None else ["--start-deadline", str(self.start_deadline)])],
                ("coordinator", "coordinator")),
            self._child("projector", ["projector", "--db", str(self.data_dir / "readmodel.duckdb")],
                        ("projector", "projector")),
            self._child("detector", ["detector"], ("detector", "detector")),
            *(
                self._child(f"worker-{i}", [
                    "worker", "--id", f"{host}-{i}", "--cache-dir", str(self.data_dir / "cache"),
                    "--isolate", self.isolate,
                ], ("worker", f"{host}-{i}"))
                for i in range(1, self.workers + 1)
            ),
        ]
        if self.dashboard_port is not None:
            self.children.append(self._dashboard_child())
        options = auth.client_options(self.admin_creds, self.ca)
        if self.cluster > 1:
            # fsync before every ack, as nats-server.conf in production: the nodes share one host.
            self.nats_cluster = Cluster(self.data_dir / "nats-cluster", self.cluster, host=self.listen,
                                        base_port=self.nats_port, sync_interval="always",
                                        extra_config=self._security_config, connect_options=options)
            await asyncio.to_thread(self.nats_cluster.start)
        else:
            server_dir = self.data_dir / "nats"
            server_dir.mkdir(exist_ok=True)
            config, security = server_dir / "nats-server.conf", self._security_config(server_dir)
            config.write_text("# written by dtf up at every start\n" + security)
            # An empty config makes nats-server warn on the terminal: without auth and TLS, none.
            self.server = EmbeddedServer(server_dir, host=self.listen, port=self.nats_port,
                                         extra_args=["-c", str(config)] if security else [])
            await asyncio.to_thread(self.server.start)
        nc = await bus.connect(self.url, name="dtf-up", **options)
        try:
            await topology.provision(nc.jetstream(), replicas=self.cluster)
        finally:
            await nc.close()
        self._write_context()
        for child in self.children:
            await self._spawn(child)
            self._watchers.append(asyncio.create_task(self._watch(child), name=f"watch-{child.name}"))

    def _child(self, name: str, args: list[str], identity: tuple[str, str]) -> Child:
        """A child process run as `identity` (role, name): it gets only that role's credentials."""
        creds = {"DTF_CREDS": str(self.registry.ensure(*identity))} if self.auth else {}
        return Child(name, [sys.executable, "-m", "dtf", *args, "--nats", "URL"],
                     self.data_dir / "logs" / f"{name}.log", creds)

    def _dashboard_child(self) -> Child:
        port = self.dashboard_port or free_port(self.listen)
        host = "127.0.0.1" if self.listen in ("0.0.0.0", "::") else self.listen
        self.dashboard_url = f"http://{host}:{port}/"
        return self._child("dashboard", ["dashboard", "--port", str(port), "--listen", self.listen],
                           ("viewer", "dashboard"))

    async def _spawn(self, child: Child) -> None:
        args = [self.url if a == "URL" else a for a in child.args]
        if child.name in self.metrics_ports():
            args += ["--metrics-port", f"{self.listen}:{self.metrics_ports()[child.name]}"]
        with child.log_path.open("ab") as out:
            child.process = await asyncio.create_subprocess_exec(
                *args, stdin=asyncio.subprocess.DEVNULL, stdout=out, stderr=out,
                env={**{k: v for k, v in os.environ.items() if k != "DTF_CREDS"}, "PYTHONUNBUFFERED": "1",
                     **({"DTF_CA": str(self.ca)} if self.ca else {}), **child.env},
            )
        log.info("started %s (pid %d), log %s", child.name, child.process.pid, child.log_path)

    async def _watch(self, child: Child) -> None:
        """Restart a child that dies on its own, a few times, with growing pauses."""
        while True:
            assert child.process is not None
            code = await child.process.wait()
            if child.restarts >= RESTART_LIMIT:
                log.error("%s exited with %d %d times; giving up on it (see %s)",
                          child.name, code, child.restarts, child.log_path)
                return
            child.restarts += 1
            log.warning("%s exited with %d; restarting (see %s)", child.name, code, child.log_path)
            await asyncio.sleep(min(2 ** child.restarts * 0.25, 5))
            await self._spawn(child)

    def metrics_ports(self) -> dict[str, int]:
        """Child name -> its metrics port, chosen once (a restarted child keeps its port)."""
        if self.metrics_port is not None and not self._metrics_ports:
            names = ["coordinator", "projector", *(f"worker-{i}" for i in range(1, self.workers + 1))]
            self._metrics_ports = {name: self.metrics_port + i if self.metrics_port else free_port(self.listen)
                                   for i, name in enumerate(names)}
        return self._metrics_ports

    @property
    def metrics_urls(self) -> dict[str, str]:
        host = "127.0.0.1" if self.listen in ("0.0.0.0", "::") else self.listen
        host = f"[{host}]" if ":" in host else host
        return {name: f"http://{host}:{port}/metrics" for name, port in self.metrics_ports().items()}

    def _write_context(self) -> None:
        context = {"nats_url": self.url, "metrics": self.metrics_urls, "pid": os.getpid(), "dashboard_url": self.dashboard_url,
                   "data_dir": str(self.data_dir.resolve()),
                   "creds": str(self.admin_creds.resolve()) if self.admin_creds else None,
                   "ca": str(self.ca.resolve()) if self.ca else None,
                   "auth_dir": str(self.registry.dir.resolve()) if self.auth else None,
                   "nats_pid_files": [str(p.resolve()) for p in self.pid_files]}
        path = self.data_dir / "context.json"
        auth.write_private(path, (json.dumps(context, indent=2) + "\n").encode())  # it names the admin key
        pointer = current_context_file()
        pointer.parent.mkdir(parents=True, exist_ok=True)
        pointer.write_text(json.dumps({"context": str(path.resolve())}) + "\n")

    async def stop(self) -> None:
        for watcher in self._watchers:
            watcher.cancel()
        await asyncio.gather(*self._watchers, return_exceptions=True)
        workers = [c for c in self.children if c.name.startswith("worker")]
        others = [c for c in self.children if c not in workers]
        for group in (workers, others):
            await asyncio.gather(*(self._terminate(c) for c in group))
        if self.server is not None:
            await asyncio.to_thread(self.server.stop)
        if self.nats_cluster is not None:
            await asyncio.to_thread(self.nats_cluster.stop)
        self._forget_context()

    async def _terminate(self, child: Child) -> None:
        process = child.process
        if process is None or process.returncode is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_GRACE_S)
        except TimeoutError:
            log.warning("%s did not stop in %.0fs; killing it", child.name, STOP_GRACE_S)
            process.kill()
            await process.wait()

    def _forget_context(self) -> None:
        """Leave no current context pointing at a system that is gone."""
        pointer = current_context_file()
        try:
            if json.loads(pointer.read_text()).get("context") == str((self.data_dir / "context.json").resolve()):
                pointer.unlink()
        except (OSError, ValueError):
            pass
