"""Leader co-location on a NATS cluster: every Raft group dtf depends on led by one node.

dtf needs several Raft groups at once: the DTF_EVENTS and DTF_HEARTBEATS streams, the object-store
streams, each worker's durable consumer and the projector's. Left alone, their leaders spread over
the nodes, so losing *any* node stalls something for a 4-9 s election (a worker whose consumer was
led there gets no assignments; heartbeats stop when DTF_HEARTBEATS was led there). With every group
led by the DTF_EVENTS leader, a follower's loss costs nothing but the reconnects of the clients that
were connected to it, and a leader's loss costs one round of elections, all at once — the same gap
a plain publisher sees. A leader stepdown with a preferred placement moves a group in tens of
milliseconds, so `colocate` moves what has drifted (after an election) back next to the events leader.

`misplaced` is the pure decision; `survey` and `colocate` are its I/O shell.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ClusterInfo
from nats.js.errors import Error as JetStreamError

from dtf.streams import topology

log = logging.getLogger("dtf.placement")

STREAMS = (topology.HEARTBEATS, topology.FEED)
"""Streams kept next to DTF_EVENTS (whose consumers are kept there too, like DTF_EVENTS' own), and
every owner's object-store bucket (`owner_buckets`)."""
OWNER_STREAMS = (f"OBJ_{topology.WORKSPACES_PREFIX}", f"OBJ_{topology.ARTIFACTS_PREFIX}")
REQUEST_TIMEOUT_S = 2.0


@dataclass(frozen=True)
class Group:
    """One Raft group: a stream (consumer None) or a durable consumer of a stream."""

    stream: str
    consumer: str | None
    leader: str
    peers: frozenset[str]

    @property
    def stepdown_subject(self) -> str:
        if self.consumer is None:
            return f"$JS.API.STREAM.LEADER.STEPDOWN.{self.stream}"
        return f"$JS.API.CONSUMER.LEADER.STEPDOWN.{self.stream}.{self.consumer}"

    def __str__(self) -> str:
        return self.stream if self.consumer is None else f"{self.stream}/{self.consumer}"


def group_of(stream: str, consumer: str | None, cluster: ClusterInfo | None) -> Group | None:
    """The group behind a stream or consumer info, or None when it is not a replicated group with a
    leader right now (R1, a single server, or mid-election: nothing to move then)."""
    if cluster is None or not cluster.leader or not cluster.replicas:
        return None
    return Group(stream, consumer, cluster.leader, frozenset([cluster.leader, *(p.name for p in cluster.replicas)]))


def owner_buckets(streams: list[str]) -> list[str]:
    """The owners' bucket streams among a list of stream names."""
    return sorted(s for s in streams if s.startswith(OWNER_STREAMS))


def misplaced(groups: list[Group], target: str) -> list[Group]:
    """The groups to move to `target`: led elsewhere, with `target` among their peers."""
    return [g for g in groups if g.leader != target and target in g.peers]


async def survey(js: JetStreamContext) -> tuple[str | None, list[Group]]:
    """The DTF_EVENTS leader (None if not clustered or electing) and every other replicated group."""
    events = await js.stream_info(topology.EVENTS)
    if group_of(topology.EVENTS, None, events.cluster) is None:
        return None, []
    groups: list[Group] = []
    names: list[str] = []
    while page := await js.streams_info(offset=len(names)):  # a page at a time (the server's cap is 256)
        names += [info.config.name for info in page]
    for stream in (topology.EVENTS, *STREAMS, *owner_buckets(names)):
        try:
            info = events if stream == topology.EVENTS else await js.stream_info(stream)
            consumers = await js.consumers_info(stream)
        except JetStreamError:  # an object store nobody created yet
            continue
        candidates = [group_of(stream, None, info.cluster) if stream != topology.EVENTS else None]
        candidates += [group_of(stream, c.name, c.cluster) for c in consumers if c.config.durable_name]
        groups += [g for g in candidates if g is not None]
    return events.cluster.leader, groups


async def colocate(nc: Client, js: JetStreamContext, previous: frozenset[str] = frozenset()) -> frozenset[str]:
    """Move the groups misplaced now that were misplaced at the previous call too (so concurrent
    callers, such as coordinator replicas, see each other's moves before repeating them); returns
    what is misplaced now, for the next call."""
    try:
        target, groups = await survey(js)
    except (NatsError, JetStreamError, TimeoutError) as exc:
        log.debug("cannot survey leaders: %s", exc)
        return frozenset()
    if target is None:
        return frozenset()
    now = misplaced(groups, target)
    payload = json.dumps({"placement": {"preferred": target}}).encode()
    for group in now:
        if str(group) not in previous:
            continue
        try:
            await nc.request(group.stepdown_subject, payload, timeout=REQUEST_TIMEOUT_S)
            log.info("moved the leader of %s from %s to %s", group, group.leader, target)
        except (NatsError, TimeoutError) as exc:
            log.debug("moving the leader of %s failed: %s", group, exc)
        await asyncio.sleep(0)  # one at a time, without starving the loop
    return frozenset(map(str, now))
