"""compose.yaml and nats-server.conf, checked without Docker: the compose file parses, has the
services the deployment needs, and every dtf service runs a real `dtf` command with real options
(parsed by the CLI's own click commands, so a typo fails here, not at 3 a.m.) under its own
credentials; the production nats-server.conf passes `nats-server -t`, refuses to start without its
secrets and users, and really forms a 3-node JetStream cluster with mutual-TLS routes, TLS for clients
and dtf's roles enforced when pointed at loopback."""

from __future__ import annotations

import asyncio
import copy
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import click
import nats
import pytest
import yaml
from nats.js.api import StreamConfig

from cli_lines import resolve_dtf_command
from dtf.streams import auth
from dtf.streams.server import binary

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "compose.yaml"
NATS_CONF = ROOT / "nats-server.conf"
NODES = ("nats1", "nats2", "nats3")
DTF_SERVICES = ("coordinator-a", "coordinator-b", "projector", "detector", "worker-1", "worker-2", "dashboard")
ROLES = {"coordinator-a": "coordinator", "coordinator-b": "coordinator", "projector": "projector",
         "detector": "detector", "worker-1": "worker", "worker-2": "worker", "dashboard": "viewer"}
"""The role each service's credentials are made with (`dtf creds add --role ROLE --name SERVICE`)."""


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_parses_and_has_every_service(compose):
    services = compose["services"]
    assert set(services) == {*NODES, *DTF_SERVICES}
    assert services["dashboard"]["ports"] == ["127.0.0.1:8050:8050"]


def test_the_nats_nodes_are_one_cluster_with_their_own_stores(compose):
    services = compose["services"]
    names, stores = set(), set()
    for node in NODES:
        service = services[node]
        assert service["image"] == "nats:2.12"
        assert service["command"] == ["--config", "/etc/nats/nats-server.conf"]
        assert {"./nats-server.conf:/etc/nats/nats-server.conf:ro", "./deploy/secrets:/etc/nats/secrets:ro",
                "./deploy/auth:/etc/nats/auth:ro"} <= set(service["volumes"])
        store = [v for v in service["volumes"] if v.endswith(":/data")]
        assert len(store) == 1 and store[0].split(":")[0] in compose["volumes"]
        stores.add(store[0])
        names.add(service["environment"]["NATS_SERVER_NAME"])
        assert service["environment"]["NATS_SYS_PASSWORD"].startswith("${NATS_SYS_PASSWORD:?"), "secrets come from .env"
    assert names == set(NODES) and len(stores) == 3
    conf = NATS_CONF.read_text()
    assert set(re.findall(r"nats-route://(nats\d):6222", conf)) == set(NODES)
    assert "server_name: $NATS_SERVER_NAME" in conf
    assert 'include "auth/users.conf"' in conf


def test_every_dtf_service_runs_a_real_dtf_command_under_its_own_credentials(compose):
    services = compose["services"]
    for name in DTF_SERVICES:
        service = services[name]
        assert service["build"] == "." and (ROOT / "Dockerfile").is_file()
        ctx = resolve_dtf_command(service["command"])
        assert ctx.command.name == service["command"][1]
        assert ctx.params["creds"] == f"/etc/dtf/creds/{name}.creds"
        assert "./deploy/creds:/etc/dtf/creds:ro" in service["volumes"]
        assert service["environment"]["DTF_CA"] == "/etc/dtf/ca.pem"
        if "name" in ctx.params or "worker_id" in ctx.params:  # coordinators and workers say who they are
            assert ctx.params.get("name", ctx.params.get("worker_id")) == name
    commands = {name: services[name]["command"][1] for name in DTF_SERVICES}
    assert commands == {"coordinator-a": "coordinator", "coordinator-b": "coordinator", "projector": "projector",
                        "detector": "detector", "worker-1": "worker", "worker-2": "worker", "dashboard": "dashboard"}
    projector = resolve_dtf_command(services["projector"]["command"])
    assert str(projector.params["db_path"]) == "/data/readmodel.duckdb"
    for worker in ("worker-1", "worker-2"):
        assert resolve_dtf_command(services[worker]["command"]).params["concurrency"] == 2
    dashboard = resolve_dtf_command(services["dashboard"]["command"])
    assert (dashboard.params["listen"], dashboard.params["port"]) == ("0.0.0.0", 8050)


def interpolate(value: str, env: dict[str, str]) -> str:
    """What compose does to `${VAR}`, `${VAR:?message}` and `${VAR:-default}` before running."""
    return re.sub(r"\$\{(\w+)(?::?[?-][^}]*)?\}", lambda m: env[m.group(1)], value)


def test_every_dtf_service_is_given_all_three_nodes_over_tls(compose):
    for name in DTF_SERVICES:
        url = resolve_dtf_command(compose["services"][name]["command"]).params["nats_url"]
        parts = [urlsplit(u) for u in url.split(",")]
        assert [(p.scheme, p.hostname, p.port, p.username, p.password) for p in parts] == [
            ("tls", node, 4222, None, None) for node in NODES
        ]


@pytest.mark.parametrize("mutate, error", [
    (lambda argv: argv.__setitem__(argv.index("--concurrency"), "--concurency"), click.NoSuchOption),
    (lambda argv: argv.__setitem__(argv.index("--concurrency") + 1, "two"), click.BadParameter),
    (lambda argv: argv.__setitem__(1, "wroker"), click.UsageError),
    (lambda argv: argv.pop(), click.BadOptionUsage),  # --concurrency left without its value
])
def test_a_misspelled_command_or_option_fails_the_check(compose, mutate, error):
    argv = copy.deepcopy(compose["services"]["worker-1"]["command"])
    resolve_dtf_command(argv)
    mutate(argv)
    with pytest.raises(error):
        resolve_dtf_command(argv)


# -- nats-server.conf ---------------------------------------------------------------------------

SECRETS_ENV = {"NATS_SYS_PASSWORD": "test-sys-pw"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def make_route_certs(directory: Path) -> Path:
    """The CA, route and client-facing certificates docs/OPERATIONS.md tells operators to make (plus
    127.0.0.1)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl not installed")
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    for args in (
        ["req", "-x509", *ec, "-days", "3650", "-subj", "/CN=dtf-nats-ca", "-keyout", "ca-key.pem", "-out", "ca.pem"],
        *(["req", "-x509", *ec, "-days", "825", "-subj", f"/CN=dtf-nats-{kind}", "-CA", "ca.pem",
           "-CAkey", "ca-key.pem", "-keyout", f"{kind}-key.pem", "-out", f"{kind}.pem",
           "-addext", "subjectAltName=DNS:nats1,DNS:nats2,DNS:nats3,IP:127.0.0.1",
           "-addext", f"extendedKeyUsage={usage}"]
          for kind, usage in (("route", "serverAuth,clientAuth"), ("server", "serverAuth"))),
    ):
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)
    return directory


def loopback_conf(tmp: Path, secrets: Path, ports: list[dict], i: int) -> Path:
    """nats-server.conf for node i with container addresses swapped for loopback ones."""
    text = NATS_CONF.read_text()
    own = ports[i]
    for old, new in (("0.0.0.0:4222", f"127.0.0.1:{own['client']}"), ("0.0.0.0:6222", f"127.0.0.1:{own['route']}"),
                     ("0.0.0.0:8222", f"127.0.0.1:{own['http']}"), ("/data/jetstream", str(tmp / f"store{i}")),
                     ("/etc/nats/secrets", str(secrets))):
        assert old in text, old
        text = text.replace(old, new)
    for k, node in enumerate(NODES):
        text = text.replace(f"nats-route://{node}:6222", f"nats-route://127.0.0.1:{ports[k]['route']}")
    path = tmp / f"{NODES[i]}.conf"
    path.write_text(text)
    return path


def users(tmp: Path) -> auth.Registry:
    """users.conf beside the loopback configs (where `include "auth/users.conf"` finds it), as
    `dtf creds add --data-dir` writes it: an admin and one worker."""
    registry = auth.Registry(tmp / "auth")
    registry.ensure("admin", "admin")
    registry.ensure("worker", "worker-1")
    return registry


def test_nats_server_conf_is_valid_and_needs_its_secrets_and_users(tmp_path):
    ports = [{"client": free_port(), "route": free_port(), "http": free_port()} for _ in NODES]
    conf = loopback_conf(tmp_path, make_route_certs(tmp_path / "secrets"), ports, 0)
    env = {**os.environ, **SECRETS_ENV, "NATS_SERVER_NAME": "nats1"}

    def check(environment: dict) -> subprocess.CompletedProcess:
        return subprocess.run([binary(), "-t", "-c", str(conf)], env=environment, capture_output=True, text=True,
                              timeout=30, check=False)

    no_users = check(env)
    assert no_users.returncode != 0 and "users.conf" in no_users.stdout + no_users.stderr
    users(tmp_path)
    checked = check(env)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    refused = check({k: v for k, v in env.items() if k != "NATS_SYS_PASSWORD"})
    assert refused.returncode != 0 and "NATS_SYS_PASSWORD" in refused.stdout + refused.stderr


async def test_nats_server_conf_forms_an_r3_cluster_with_tls_routes(tmp_path):
    secrets = make_route_certs(tmp_path / "secrets")
    registry = users(tmp_path)
    admin = auth.client_options(registry.ensure("admin", "admin"), secrets / "ca.pem")
    ports = [{"client": free_port(), "route": free_port(), "http": free_port()} for _ in NODES]
    processes = []
    try:
        for i, node in enumerate(NODES):
            conf = loopback_conf(tmp_path, secrets, ports, i)
            processes.append(subprocess.Popen(
                [binary(), "-c", str(conf), "-l", str(tmp_path / f"{node}.log")],
                env={**os.environ, **SECRETS_ENV, "NATS_SERVER_NAME": node}, stdin=subprocess.DEVNULL,
            ))
        url = f"tls://127.0.0.1:{ports[0]['client']}"
        js = None
        for _ in range(150):  # bounded: the meta leader election takes a few seconds
            try:  # bounded: nats-py retries a refused first server forever
                nc = await asyncio.wait_for(nats.connect(url, allow_reconnect=False, max_reconnect_attempts=1,
                                                         connect_timeout=1, error_cb=_quiet, **admin), 3)
            except Exception:  # noqa: BLE001 - not listening yet
                await asyncio.sleep(0.2)
                continue
            js = nc.jetstream(timeout=2)
            try:
                await js.add_stream(StreamConfig(name="PROD_CONF", subjects=["prod.>"], num_replicas=3))
                break
            except Exception:  # noqa: BLE001 - no meta leader yet
                await nc.close()
                js = None
                await asyncio.sleep(0.2)
        assert js is not None, "the cluster never accepted an R3 stream; see the node logs in " + str(tmp_path)
        try:
            info = await js.stream_info("PROD_CONF")
            assert info.config.num_replicas == 3
            assert {info.cluster.leader, *(p.name for p in info.cluster.replicas)} == set(NODES)
            assert (await js.publish("prod.x", b"durable")).seq == 1
            with pytest.raises(nats.errors.Error, match="[Aa]uthorization"):  # TLS, but no key: no entry
                await asyncio.wait_for(nats.connect(f"tls://127.0.0.1:{ports[1]['client']}", allow_reconnect=False,
                                                    max_reconnect_attempts=1, connect_timeout=1, error_cb=_quiet,
                                                    tls=admin["tls"]), 5)
            worker = auth.client_options(registry.ensure("worker", "worker-1"), secrets / "ca.pem")
            refused: list[Exception] = []

            async def note(exc: Exception) -> None:
                refused.append(exc)

            wnc = await nats.connect(f"tls://127.0.0.1:{ports[2]['client']}", allow_reconnect=False,
                                     max_reconnect_attempts=1, error_cb=note, **worker)
            try:  # the roles hold: a worker may not publish as another worker
                await wnc.publish("dtf.hb.worker-2", b"{}")
                await wnc.flush()
                for _ in range(50):
                    if refused:
                        break
                    await asyncio.sleep(0.1)
                assert refused and "permissions violation" in str(refused[0]).lower()
            finally:
                await wnc.close()
        finally:
            await nc.close()
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=15)


async def _quiet(exc: Exception) -> None:
    pass
