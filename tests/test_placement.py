"""Leader co-location (dtf.streams.placement): the pure choice of what to move, and on a real 3-node
cluster every replicated group dtf needs ends up led by the DTF_EVENTS leader, so a follower's loss
stalls none of them."""

from __future__ import annotations

import asyncio

from hypothesis import given
from hypothesis import strategies as st

from dtf.streams import bus, placement, reader, topology
from dtf.streams.cluster import Cluster

NODES = ["n1", "n2", "n3", "n4"]
POLL_BOUND = 40
"""Rounds a check may poll for the cluster to settle: a bound on a loop, not an assertion."""


groups = st.lists(st.builds(
    placement.Group, stream=st.sampled_from(["S", "T"]), consumer=st.none() | st.sampled_from(["a", "b"]),
    leader=st.sampled_from(NODES), peers=st.frozensets(st.sampled_from(NODES), min_size=1),
), max_size=8)


@given(groups, st.sampled_from(NODES))
def test_only_groups_led_elsewhere_that_can_be_led_by_the_target_are_moved(gs, target):
    moved = placement.misplaced(gs, target)
    assert all(g.leader != target and target in g.peers for g in moved)
    assert [g for g in gs if g not in moved and g.leader != target and target in g.peers] == []


def test_a_consumer_stepdown_names_its_stream_and_consumer():
    consumer = placement.Group("DTF_EVENTS", "worker-w1", "n1", frozenset(["n1", "n2"]))
    assert consumer.stepdown_subject == "$JS.API.CONSUMER.LEADER.STEPDOWN.DTF_EVENTS.worker-w1"
    assert placement.Group("S", None, "n1", frozenset()).stepdown_subject == "$JS.API.STREAM.LEADER.STEPDOWN.S"


async def test_colocate_brings_every_replicated_group_to_the_events_leader(tmp_path):
    with Cluster(tmp_path / "cluster", 3) as cluster:
        nc = await bus.connect(cluster.url, name="placement-test")
        try:
            js = nc.jetstream()
            await topology.provision(js, replicas=3)
            for wid in ("w1", "w2", "w3"):
                await js.add_consumer(topology.EVENTS, topology.worker_consumer(wid))
            await js.add_consumer(topology.EVENTS, topology.projector_consumer())
            await js.add_consumer(topology.HEARTBEATS, topology.projector_heartbeats_consumer())
            # Spread the groups: move the events leader away from wherever the others are.
            await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{topology.EVENTS}", b"", timeout=5)

            previous: frozenset[str] = frozenset()
            for _ in range(POLL_BOUND):
                previous = await placement.colocate(nc, js, previous)
                leader, groups = await placement.survey(js)
                if leader is not None and len(groups) >= 7 and not placement.misplaced(groups, leader):
                    break
                await asyncio.sleep(0.5)
            leader, groups = await placement.survey(js)
            assert leader is not None
            assert {str(g) for g in groups} >= {
                "DTF_HEARTBEATS", "DTF_EVENTS/worker-w1", "DTF_EVENTS/worker-w2", "DTF_EVENTS/worker-w3",
                "DTF_EVENTS/projector", "DTF_HEARTBEATS/projector-hb",
            }
            assert {g.leader for g in groups} == {leader}
        finally:
            await nc.close()


async def test_an_ordered_consumer_near_the_leader_is_placed_on_the_stream_leaders_node(tmp_path):
    with Cluster(tmp_path / "cluster", 3) as cluster:
        nc = await bus.connect(cluster.url, name="placement-test")
        try:
            js = nc.jetstream()
            await topology.provision(js, replicas=3)
            leader = (await js.stream_info(topology.EVENTS)).cluster.leader
            for _ in range(4):  # several: a random placement would miss sooner or later
                consumer = reader.OrderedConsumer(js, topology.EVENTS, ["dtf.worker.>"], near_leader=True)
                info = await consumer.open()
                assert info.cluster.leader == leader
                await consumer.close()
        finally:
            await nc.close()
