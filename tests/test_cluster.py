"""A real 3-node JetStream cluster (streams.cluster.Cluster: nats-server processes on free loopback
ports, each with a temp store): R3 streams, a follower's SIGKILL unnoticed by publishers, a killed
node rejoining, a whole cluster resuming from its data dir, and `dtf up --cluster 3` end to end."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import StreamInfo

from dtf.streams import buckets, bus, topology
from dtf.streams.cluster import STATE_FILE, Cluster

REJOIN_BOUND_S = 60.0
"""How long a check may poll for a restarted node to catch up: a bound on a loop, not an assertion."""


@pytest.fixture
def cluster(tmp_path):
    with Cluster(tmp_path / "cluster", 3) as running:
        yield running


@pytest.fixture
async def client(cluster):
    nc = await bus.connect(cluster.urls[0], name="dtf-cluster-tests")
    await topology.provision(nc.jetstream(), replicas=3)
    yield nc
    await nc.close()


def peers(info: StreamInfo) -> set[str]:
    return {info.cluster.leader, *(p.name for p in info.cluster.replicas or [])}


async def publish(js: JetStreamContext, n: int) -> int:
    ack = await js.publish(f"dtf.worker.test-{n}.registered", b"{}", headers={"Nats-Msg-Id": f"cluster-test-{n}"})
    assert ack.stream == topology.EVENTS and not ack.duplicate
    return ack.seq


def a_follower_the_client_is_not_on(cluster: Cluster, info: StreamInfo, nc: Client) -> int:
    """A node that is neither the stream's leader nor the one the client is connected to."""
    leader = cluster.index_of(info.cluster.leader)
    connected = next(i for i, url in enumerate(cluster.urls) if url.endswith(f":{nc.connected_url.port}"))
    return next(i for i in range(cluster.size) if i not in (leader, connected))


async def test_streams_provisioned_with_replicas_3_have_3_replicas_and_take_publishes(cluster, client):
    js = client.jetstream()
    await buckets.create(js, topology.workspaces_bucket("alice"))  # an owner's bucket takes the events' replicas
    for stream in (topology.EVENTS, topology.HEARTBEATS, f"OBJ_{topology.workspaces_bucket('alice')}"):
        info = await js.stream_info(stream)
        assert info.config.num_replicas == 3
        assert peers(info) == {cluster.server_name(i) for i in range(3)}
    assert await publish(js, 1) == 1


async def test_killing_a_follower_does_not_stop_publishes(cluster, client):
    js = client.jetstream()
    before = await publish(js, 1)
    victim = a_follower_the_client_is_not_on(cluster, await js.stream_info(topology.EVENTS), client)
    cluster.kill(victim)
    assert await publish(js, 2) == before + 1
    assert await publish(js, 3) == before + 2
    info = await js.stream_info(topology.EVENTS)
    assert info.state.messages == 3 and info.cluster.leader != cluster.server_name(victim)


@pytest.mark.slow
async def test_a_killed_node_restarts_on_its_store_and_rejoins(cluster, client):
    js = client.jetstream()
    await publish(js, 1)
    victim = a_follower_the_client_is_not_on(cluster, await js.stream_info(topology.EVENTS), client)
    urls = cluster.urls
    cluster.kill(victim)
    for n in range(2, 6):
        await publish(js, n)  # written while the node is down: it must catch up on them
    cluster.restart(victim)
    assert cluster.urls == urls, "a restarted node keeps its address"
    name = cluster.server_name(victim)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REJOIN_BOUND_S
    while True:
        info = await js.stream_info(topology.EVENTS)
        replica = {p.name: p for p in info.cluster.replicas or []}.get(name)
        if info.cluster.leader == name or (replica is not None and replica.current and not replica.offline
                                           and not replica.lag):
            break
        assert loop.time() < deadline, f"{name} did not rejoin: {info.cluster}"
        await asyncio.sleep(0.2)
    # A direct get is answered by a replica on the client's own server when there is one: read
    # through the restarted node the message it missed while it was down.
    nc = await bus.connect(cluster.urls[victim], name="dtf-cluster-tests-direct")
    try:
        msg = await nc.jetstream().get_msg(topology.EVENTS, 5, direct=True)
        assert msg.subject == "dtf.worker.test-5.registered"
    finally:
        await nc.close()
    assert await publish(js, 6) == 6


@pytest.mark.slow
async def test_a_whole_cluster_restarted_on_its_data_dir_resumes(tmp_path):
    data = tmp_path / "cluster"
    with Cluster(data, 3) as first:
        urls = first.urls
        nc = await bus.connect(first.url.split(",")[0], name="dtf-cluster-tests")
        await topology.provision(nc.jetstream(), replicas=3)
        for n in (1, 2, 3):
            await publish(nc.jetstream(), n)
        await nc.close()
    assert json.loads((data / STATE_FILE).read_text())["size"] == 3
    with Cluster(data, 3) as second:
        assert second.urls == urls
        nc = await bus.connect(second.urls[1], name="dtf-cluster-tests")
        js = nc.jetstream()
        await topology.provision(js, replicas=3)  # idempotent on the existing streams
        info = await js.stream_info(topology.EVENTS)
        assert info.state.messages == 3 and info.config.num_replicas == 3
        assert await publish(js, 4) == 4
        await nc.close()


async def test_a_client_given_every_node_connects_while_one_is_down(cluster):
    cluster.kill(0)
    nc = await asyncio.wait_for(bus.connect(cluster.url, name="dtf-cluster-tests"), 30)
    try:
        assert f"nats://127.0.0.1:{nc.connected_url.port}" in cluster.urls[1:]
    finally:
        await nc.close()


@pytest.mark.slow
def test_dtf_up_cluster_3_runs_a_task_and_stops_cleanly(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    env.pop("DTF_NATS_URL", None)
    data = tmp_path / "d"
    log = (tmp_path / "up.log").open("ab")
    up = subprocess.Popen(
        [sys.executable, "-m", "dtf", "up", "--cluster", "3", "--workers", "1", "--data-dir", str(data),
         "--nats-port", "0", "--no-dashboard", "--no-auth"],
        stdout=subprocess.PIPE, stderr=log, env=env, text=True,
    )
    try:
        line = up.stdout.readline()
        assert line.startswith("export DTF_NATS_URL="), f"dtf up printed {line!r}; see {tmp_path / 'up.log'}"
        url = line.strip().split("=", 1)[1]
        nodes = json.loads((data / "nats-cluster" / STATE_FILE).read_text())["nodes"]
        assert url.split(",") == [f"nats://127.0.0.1:{node['client_port']}" for node in nodes]
        assert json.loads((data / "context.json").read_text())["nats_url"] == url

        async def replicas() -> int:
            nc = await bus.connect(url, name="dtf-cluster-tests")
            try:
                return (await nc.jetstream().stream_info(topology.EVENTS)).config.num_replicas
            finally:
                await nc.close()

        assert asyncio.run(replicas()) == 3
        work = tmp_path / "work"
        work.mkdir()
        done = subprocess.run([sys.executable, "-m", "dtf", "submit", "--command", "true", "--wait"],
                              capture_output=True, text=True, env=env, cwd=work, timeout=120, check=False)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
        code = up.wait(timeout=60)
        log.close()
    assert code == 0
    assert not (tmp_path / "state" / "dtf" / "current.json").exists()
