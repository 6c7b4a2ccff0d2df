"""A local nats-server cluster: N EmbeddedServer nodes routed to each other on one host, each with its
own JetStream store, for `dtf up --cluster 3`, the durability bench and the tests.

Every node gets a config file under its data dir (server_name, the cluster block with routes to all
nodes, JetStream settings); EmbeddedServer adds the client port, store dir and readiness file. The
ports are chosen once and written to `cluster.json` in the data dir, so a node (or the whole cluster)
restarted on the same data dir comes back at the same addresses and with the same server names: the
Raft peers recognise it and it catches up instead of joining as a stranger.

Ready means every node accepts clients, JetStream answers on every node (a meta leader has been
elected and every node knows it: `js.account_info()` succeeds through each node), and every existing
stream has elected its leader (that matters after a restart on an existing data dir).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import nats
from nats.errors import Error as NatsError

from dtf.streams.server import EmbeddedServer, ServerError

READY_TIMEOUT_S = 30.0
"""Starting three nodes and electing a meta leader takes a few seconds on loopback."""
STATE_FILE = "cluster.json"
T = TypeVar("T")


def free_port(host: str = "127.0.0.1") -> int:
    """A port free right now on `host` (the kernel picks it; it is released at once)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _run(coro_fn: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion on a private loop in its own thread, so the sync API works from
    plain code, from a thread (asyncio.to_thread) and from inside a running loop alike."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(asyncio.run(coro_fn()))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
            error.append(exc)

    thread = threading.Thread(target=target, name="dtf-cluster-probe", daemon=True)
    thread.start()
    thread.join()
    if error:
        raise error[0]
    return result[0]


async def _connect_once(url: str, options: dict | None = None):
    """One bounded connection attempt (`options`: credentials, TLS). (nats-py retries a refused first
    server forever, even with allow_reconnect=False and max_reconnect_attempts=0, so the bound is a
    wait_for.)"""
    return await asyncio.wait_for(
        nats.connect(url, allow_reconnect=False, connect_timeout=1, max_reconnect_attempts=1,
                     error_cb=_quiet, **(options or {})), 3.0)


async def _quiet(exc: Exception) -> None:
    """Connection errors while polling are expected; the poll reports the last one if it times out."""


async def _jetstream_answers(url: str, options: dict | None = None) -> str | None:
    """None when JetStream answers through the node at `url`, else why not."""
    try:
        nc = await _connect_once(url, options)
    except Exception as exc:  # noqa: BLE001 - nats-py raises many types for "could not connect"
        return f"connect: {exc or type(exc).__name__}"
    try:
        await nc.jetstream(timeout=1.0).account_info()
        return None
    except (NatsError, TimeoutError) as exc:
        return f"jetstream: {exc or type(exc).__name__}"
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


async def _streams_without_leader(url: str, options: dict | None = None) -> list[str]:
    """Streams that have not elected a leader yet (after a whole-cluster restart each stream's Raft
    group elects its own, after the meta leader), as seen through the node at `url`."""
    try:
        nc = await _connect_once(url, options)
    except Exception as exc:  # noqa: BLE001
        return [f"(connect: {exc or type(exc).__name__})"]
    try:
        infos = await nc.jetstream(timeout=2.0).streams_info()
        return [i.config.name for i in infos if i.cluster is not None and not i.cluster.leader]
    except (NatsError, TimeoutError) as exc:
        return [f"(jetstream: {exc or type(exc).__name__})"]
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


class Cluster:
    """N nats-server nodes (node i is `nodes[i]`, server name `<name>-n<i+1>`) on `host`.

    `base_port` 0 picks free client ports; otherwise node i listens on base_port + i. Route ports are
    always free ports. Both are kept in `<data_dir>/cluster.json` after the first start.
    `sync_interval` sets JetStream's fsync policy (None: the server default, "always", "1s", ...).
    `extra_config(node_dir)` adds config text to each node (authorization, TLS), and `connect_options`
    are what the readiness probes connect with (credentials, TLS context).
    """

    def __init__(self, data_dir: Path, size: int = 3, *, host: str = "127.0.0.1", base_port: int = 0,
                 name: str = "dtf", sync_interval: str | None = None,
                 extra_config: Callable[[Path], str] | None = None, connect_options: dict | None = None) -> None:
        if size < 1:
            raise ValueError("a cluster needs at least one node")
        self.data_dir = Path(data_dir)
        self.size = size
        self.host = host
        self.base_port = base_port
        self.name = name
        self.sync_interval = sync_interval
        self.extra_config = extra_config
        self.connect_options = connect_options or {}
        self.nodes: list[EmbeddedServer] = []
        self.layout: list[dict] = []

    # -- addresses ---------------------------------------------------------------------------------

    @property
    def urls(self) -> list[str]:
        """Every node's client URL, node order."""
        return [node.url for node in self.nodes]

    @property
    def url(self) -> str:
        """All client URLs comma-joined (nats CLI / `--nats` style)."""
        return ",".join(self.urls)

    def server_name(self, i: int) -> str:
        return self.layout[i]["server_name"]

    def index_of(self, server_name: str) -> int:
        """Which node has this server name (as reported by stream_info().cluster.leader/replicas)."""
        for i, node in enumerate(self.layout):
            if node["server_name"] == server_name:
                return i
        raise KeyError(server_name)

    # -- layout --------------------------------------------------------------------------------------

    def _route_host(self) -> str:
        return "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host

    def _load_or_create_layout(self) -> list[dict]:
        state = self.data_dir / STATE_FILE
        if state.exists():
            saved = json.loads(state.read_text())
            if saved.get("size") != self.size:
                raise ServerError(f"{state} describes a {saved.get('size')}-node cluster, not {self.size}: "
                                  "use another data dir or the same --cluster size")
            ports = [node["client_port"] for node in saved["nodes"]]
            if self.base_port and self.base_port != ports[0]:
                raise ServerError(f"{state}: this cluster's nodes listen on ports {ports}; start it with "
                                  f"port {ports[0]} (or 0), or use another data dir")
            return saved["nodes"]
        taken: set[int] = set()

        def pick(port: int = 0) -> int:
            while not port or port in taken:  # the kernel may hand the same free port out twice
                port = free_port(self._route_host())
            taken.add(port)
            return port

        layout = []
        for i in range(self.size):
            layout.append({
                "server_name": f"{self.name}-n{i + 1}",
                "client_port": pick(self.base_port + i if self.base_port else 0),
                "cluster_port": pick(),
            })
        self.data_dir.mkdir(parents=True, exist_ok=True)
        state.write_text(json.dumps({"size": self.size, "nodes": layout}, indent=2) + "\n")
        return layout

    def _write_config(self, i: int) -> Path:
        node = self.layout[i]
        node_dir = self.data_dir / f"n{i + 1}"
        node_dir.mkdir(parents=True, exist_ok=True)
        routes = ", ".join(f"nats-route://{self._route_host()}:{n['cluster_port']}" for n in self.layout)
        lines = [
            "# written by dtf.streams.cluster; regenerated at every start",
            f"server_name: {json.dumps(node['server_name'])}",
            "cluster {",
            f"  name: {json.dumps(self.name)}",
            f"  listen: {json.dumps(self.host + ':' + str(node['cluster_port']))}",
            f"  routes: [{routes}]",
            "}",
            "jetstream {  # store_dir: EmbeddedServer passes -sd <node dir>/jetstream",
        ]
        if self.sync_interval:
            lines.append(f"  sync_interval: {self.sync_interval}")
        lines += ["}", ""]
        if self.extra_config is not None:
            lines.append(self.extra_config(node_dir))
        config = node_dir / "nats-server.conf"
        config.write_text("\n".join(lines))
        return config

    # -- lifecycle -----------------------------------------------------------------------------------

    def start(self, timeout: float = READY_TIMEOUT_S) -> Cluster:
        """Start every node, then wait until JetStream answers through each one."""
        self.layout = self._load_or_create_layout()
        self.nodes = []
        for i, node in enumerate(self.layout):
            config = self._write_config(i)
            self.nodes.append(EmbeddedServer(self.data_dir / f"n{i + 1}", host=self.host,
                                             port=node["client_port"], extra_args=["-c", str(config)]))
        try:
            # A clustered node opens its client port before it has found its peers, so the nodes
            # start one after the other quickly and the election happens while we poll.
            for node in self.nodes:
                node.start()
            self.wait_ready(timeout=timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, nodes: list[int] | None = None, timeout: float = READY_TIMEOUT_S) -> None:
        """Until JetStream answers through every listed node (all by default), or ServerError."""
        targets = list(range(self.size)) if nodes is None else nodes

        async def poll() -> None:
            deadline = time.monotonic() + timeout
            waiting = dict.fromkeys(targets, "not asked yet")
            while waiting:
                for i in list(waiting):
                    process = self.nodes[i].process
                    if process is None or process.poll() is not None:
                        raise ServerError(f"node {self.server_name(i)} is not running "
                                          f"(log {self.nodes[i].log_file})")
                    problem = await _jetstream_answers(self.nodes[i].url, self.connect_options)
                    if problem is None:
                        del waiting[i]
                    else:
                        waiting[i] = problem
                if not waiting:
                    leaderless = await _streams_without_leader(
                        self.nodes[targets[0]].url, self.connect_options)
                    if not leaderless:
                        return
                    waiting[targets[0]] = f"streams without a leader yet: {', '.join(leaderless)}"
                if time.monotonic() > deadline:
                    detail = "; ".join(f"{self.server_name(i)}: {why}" for i, why in waiting.items())
                    raise ServerError(f"JetStream cluster not ready after {timeout:.0f}s ({detail})")
                await asyncio.sleep(0.2)

        _run(poll)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM every node at once and wait for them (SIGKILL after `timeout`)."""
        running = [node for node in self.nodes if node.process is not None and node.process.poll() is None]
        if not running:
            return
        with ThreadPoolExecutor(max_workers=len(running)) as pool:
            list(pool.map(lambda node: node.stop(timeout), running))

    def kill(self, i: int) -> None:
        """SIGKILL node i: no shutdown, no flush, as in a crash."""
        self.nodes[i].kill()

    def restart(self, i: int, timeout: float = READY_TIMEOUT_S) -> None:
        """Start node i again (same ports, name and store) and wait until JetStream answers on it."""
        self.nodes[i].stop()
        self._write_config(i)
        self.nodes[i].start()
        self.wait_ready([i], timeout=timeout)

    def __enter__(self) -> Cluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
