"""Reading a stream in order through a consumer whose name the server lets only this user take.

A JetStream consumer is created on `$JS.API.CONSUMER.CREATE.<stream>.<name>[.<filter>]`, and a
permission sees only that subject. Permission wildcards match whole tokens, so a name cannot be
pinned by prefix: each user gets a small pool of exact names instead, `r-<key>-0` ... `r-<key>-15`
(`f-...` on DTF_FEED), where `<key>` is the public nkey the user signs in with. The client knows it
without its credentials file: it is the second token of the connection's inbox prefix
(`dtf.streams.auth.inbox_prefix`). dtf.streams.auth grants a user only its own pool, so no reader can
create, update or delete another user's consumer, let alone a worker's or the projector's durable.

A reader takes a name with the create action "create", which the server refuses when the name
exists (10148), and tries the next; so concurrent readers of one user get distinct names (each
consumer delivers to its own inbox, so no two configs are ever equal, which "create" would accept).
It deletes its consumer when done, and `INACTIVE_S` without a subscriber frees the name of one that
crashed. Without a key (no auth, or a NATS JWT) any name will do: a random one.

The consumer is an ordered push consumer, as nats.py's, which cannot take its name from a pool: R1
in memory, no acks, flow control and idle heartbeats. A consumer sequence that skips, a heartbeat
naming a later one than we saw, or silence for `MISSED_HEARTBEATS` intervals re-creates it from the
stream sequence after the last message received. Flow-control replies go out once the caller has
taken every message before them, so a slow caller holds the server back instead of filling memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import re
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo, DeliverPolicy
from nats.js.errors import APIError
from nats.js.errors import Error as JetStreamError

log = logging.getLogger("dtf.reader")

READER = "r"
"""Name prefix of a user's pool on DTF_EVENTS and DTF_HEARTBEATS (and any stream but the feed)."""
FEED_READER = "f"
"""Name prefix of a submitter's pool on DTF_FEED."""
POOL_SIZE = 16
"""Consumers one user may hold on one stream at once."""
IDLE_HEARTBEAT_S = 2.0
MISSED_HEARTBEATS = 3
"""Heartbeat intervals of silence after which the consumer is taken for lost and made again."""
INACTIVE_S = 10.0
"""A consumer without a subscriber is deleted by the server this soon: a crashed reader's name is free."""
CREATE_TIMEOUT_S = 5.0
NAME_TAKEN = 10148
"""JetStream's error code when the create action meets an existing consumer of that name."""
POOL_WAIT_S = INACTIVE_S + 5.0
"""How long a reader waits for a name when every name of its pool is taken."""
PLACEMENT_CHECK_S = 2.0
"""How long creating a consumer to place beside the stream leader may take before we try another:
one the server put on a node that just died never answers."""
PLACEMENT_TRIES = 20
"""Consumers created before giving up on placing one beside the stream leader: on three nodes each
lands there with chance 1/3, so twenty tries all miss once in ~3,000 follows."""

_USER_KEY = re.compile(r"U[A-Z2-7]{55}")


class PoolExhausted(JetStreamError):
    """Every consumer name this user may take on the stream stayed in use for POOL_WAIT_S."""


@dataclass(frozen=True)
class StoredMsg:
    stream: str
    seq: int
    subject: str
    data: bytes
    pending: int = 0
    """Messages still to come after this one when it was delivered: 0 means caught up."""
    msg_id: str = ""
    """Its Nats-Msg-Id header: a republished message's sequence in its source (dtf.streams.feed)."""


def pool(prefix: str, key: str, size: int = POOL_SIZE) -> list[str]:
    """The consumer names user `key` may take: what dtf.streams.auth grants, and what a reader tries.
    A user name cannot collide with a durable (`worker-<id>`, the projector's, which may not start
    with `r-` or `f-`), and `<key>` is a fixed-width nkey, so two users' pools never overlap."""
    return [f"{prefix}-{key}-{k}" for k in range(size)]


def user_key(nc: Client) -> str | None:
    """The public nkey of the user `nc` signed in as, from its inbox prefix; None without one."""
    tokens = nc.new_inbox().split(".")
    return tokens[1] if len(tokens) == 3 and _USER_KEY.fullmatch(tokens[1]) else None


def candidates(nc: Client, prefix: str) -> list[str]:
    """Names to try, in order: the user's pool from a random place (concurrent readers rarely meet),
    or one random name when the server pins none."""
    key = user_key(nc)
    if key is None:
        return [f"{prefix}-{secrets.token_hex(8)}"]
    names = pool(prefix, key)
    start = random.randrange(len(names))
    return names[start:] + names[:start]


def ack_fields(reply: str) -> tuple[int, int, int]:
    """(stream sequence, consumer sequence, pending) from a JetStream delivery's reply subject:
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<dseq>.<ts>.<pending>`, or the v2 form with a
    domain and an account hash after `$JS.ACK` (and a random token at the end). ValueError otherwise."""
    tokens = reply.split(".")
    if tokens[:2] != ["$JS", "ACK"] or len(tokens) not in (9, 11, 12):
        raise ValueError(f"not a JetStream delivery: {reply!r}")
    at = 0 if len(tokens) == 9 else 2
    return int(tokens[5 + at]), int(tokens[6 + at]), int(tokens[8 + at])


def consumer_config(name: str, deliver_subject: str, filters: list[str], start: DeliverPolicy,
                    start_seq: int | None) -> ConsumerConfig:
    config = ConsumerConfig(
        name=name, deliver_subject=deliver_subject, deliver_policy=start, opt_start_seq=start_seq,
        ack_policy=AckPolicy.NONE, max_deliver=1, flow_control=True, idle_heartbeat=IDLE_HEARTBEAT_S,
        num_replicas=1, mem_storage=True, inactive_threshold=INACTIVE_S,
    )
    if len(filters) == 1:
        config.filter_subject = filters[0]
    else:
        config.filter_subjects = filters
    return config


def create_subject(stream: str, config: ConsumerConfig) -> str:
    """The filtered create form when there is one filter (a submitter may use only that, with its own
    prefix), else the named one."""
    base = f"$JS.API.CONSUMER.CREATE.{stream}.{config.name}"
    one = config.filter_subject
    return f"{base}.{one}" if one and one != ">" else base


class _Mark:
    """A control item in the delivery queue, in order with the messages around it."""


RESET = _Mark()
ALIVE = _Mark()


@dataclass
class _FlowControl:
    reply: str


@dataclass
class OrderedConsumer:
    """One ordered read of `stream`: `open` makes the consumer, `next` hands out messages in order,
    `close` deletes it. Deliveries are checked in the subscription's callback (sequence gaps,
    heartbeats) and queued with control marks, so the caller's loop does no parsing of its own."""

    js: JetStreamContext
    stream: str
    filters: list[str]
    prefix: str = READER
    deliver: DeliverPolicy = DeliverPolicy.ALL
    start_seq: int | None = None
    near_leader: bool = False
    name: str = ""
    """The consumer it holds now ("" for none)."""
    last_seq: int = 0
    """Stream sequence of the last message received: a new consumer starts after it."""
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _sub: object | None = None
    _generation: int = 0
    _dseq: int = 0

    async def open(self) -> ConsumerInfo:
        """Subscribe a fresh inbox and create the consumer under a free name (beside the stream
        leader, with `near_leader`, on a cluster)."""
        resume = self.last_seq
        for tries_left in reversed(range(PLACEMENT_TRIES if self.near_leader else 1)):
            placing = tries_left > 0
            info = await self._create(PLACEMENT_CHECK_S if placing else CREATE_TIMEOUT_S, placing)
            if info is not None and (not placing or await self._beside_leader(info)):
                return info
            await self._drop()
            # What the misplaced consumer delivered meanwhile went with its queue: the next one
            # starts where this one did, or those messages would be skipped.
            self.last_seq = resume
        raise AssertionError("unreachable")

    async def _create(self, timeout: float, placing: bool) -> ConsumerInfo | None:
        """Try the names until one is free (waiting while all are taken). While `placing`, None when
        the server did not answer within `timeout`: the consumer went to a node that just died."""
        nc = self.js._nc  # noqa: SLF001 - the connection the JetStream context talks through
        self._generation += 1
        self._dseq, self._queue = 0, asyncio.Queue()
        inbox = nc.new_inbox()
        self._sub = await nc.subscribe(inbox, cb=self._receiver(self._generation),
                                       pending_msgs_limit=1_000_000, pending_bytes_limit=1024 * 1024 * 1024)
        if self.last_seq:
            deliver, start_seq = DeliverPolicy.BY_START_SEQUENCE, self.last_seq + 1
        else:
            deliver, start_seq = self.deliver, self.start_seq
        loop = asyncio.get_running_loop()
        deadline, pause = loop.time() + POOL_WAIT_S, 0.05
        while True:
            for name in candidates(nc, self.prefix):
                config = consumer_config(name, inbox, self.filters, deliver, start_seq)
                request = json.dumps({"stream_name": self.stream, "config": config.as_dict(),
                                      "action": "create"})
                try:
                    reply = await self.js._api_request(  # noqa: SLF001 - nats.py's add_consumer has no action
                        create_subject(self.stream, config), request.encode(), timeout=timeout)
                except APIError as exc:
                    if exc.err_code == NAME_TAKEN:
                        continue
                    raise
                except TimeoutError:  # nats.py's is one too
                    if not placing:
                        raise
                    # If it was made after all, it has no subscriber once _drop unsubscribes: the
                    # server drops it. Deleting it by name could hit another reader's that took it.
                    return None
                self.name = name
                return ConsumerInfo.from_response(reply)
            if loop.time() > deadline:
                raise PoolExhausted(f"every consumer name of this user on {self.stream} stayed in use for "
                                    f"{POOL_WAIT_S:.0f} s: too many readers at once")
            await asyncio.sleep(pause)
            pause = min(pause * 2, 1.0)

    async def _beside_leader(self, info: ConsumerInfo) -> bool:
        if info.cluster is None or not info.cluster.leader:
            return True  # a single server
        leader = (await self.js.stream_info(self.stream)).cluster
        return leader is None or not leader.leader or leader.leader == info.cluster.leader

    def _receiver(self, generation: int):
        queue = self._queue

        async def receive(msg: Msg) -> None:
            if generation != self._generation:
                return  # a replaced consumer's late delivery
            headers = msg.headers
            if not msg.data and headers and headers.get("Status") == "100":
                if (headers.get("Description") or "").startswith("Flow"):
                    queue.put_nowait(_FlowControl(msg.reply))
                    return
                if stalled := headers.get("Nats-Consumer-Stalled"):
                    queue.put_nowait(_FlowControl(stalled))
                last = headers.get("Nats-Last-Consumer")
                if last is not None and int(last) != self._dseq:
                    self._broken(f"a heartbeat names consumer sequence {last}, we saw {self._dseq}")
                else:
                    queue.put_nowait(ALIVE)
                return
            try:
                sseq, dseq, pending = ack_fields(msg.reply)
            except ValueError as exc:  # not from JetStream: nothing to deliver
                log.warning("%s: ignoring a message on consumer %s's inbox: %s", self.stream, self.name, exc)
                return
            if dseq != self._dseq + 1:
                self._broken(f"consumer sequence {dseq} after {self._dseq}")
                return
            self._dseq, self.last_seq = dseq, sseq
            queue.put_nowait(StoredMsg(self.stream, sseq, msg.subject, msg.data, pending,
                                       headers.get("Nats-Msg-Id", "") if headers else ""))

        return receive

    def _broken(self, why: str) -> None:
        log.info("%s: ordered consumer %s lost its place (%s); making it again", self.stream, self.name, why)
        self._generation += 1
        self._queue.put_nowait(RESET)

    async def next(self) -> StoredMsg:
        """The next message in stream order, through resets (a server away is waited for)."""
        nc = self.js._nc  # noqa: SLF001
        while True:
            try:
                item = self._queue.get_nowait()
            except asyncio.QueueEmpty:
                try:
                    item = await asyncio.wait_for(self._queue.get(), IDLE_HEARTBEAT_S * MISSED_HEARTBEATS)
                except TimeoutError:  # no message, no heartbeat: the consumer is gone
                    log.info("%s: ordered consumer %s went silent; making it again", self.stream, self.name)
                    item = RESET
            if isinstance(item, StoredMsg):
                return item
            if isinstance(item, _FlowControl):
                await nc.publish(item.reply)
            elif item is RESET:
                await self._drop()
                try:
                    await self.open()
                except (NatsError, JetStreamError, TimeoutError) as exc:
                    # The server is away: as nats.py does, keep trying; the silence that follows
                    # brings the next reset.
                    log.warning("%s: cannot make the ordered consumer again (%s); retrying", self.stream, exc)

    async def _drop(self) -> None:
        """Unsubscribe and delete the consumer (best effort: unheard, the server drops it anyway).
        Its name is forgotten either way: once free, another reader of this user may take it."""
        self._generation += 1
        sub, self._sub = self._sub, None
        name, self.name = self.name, ""
        nc = self.js._nc  # noqa: SLF001
        if nc.is_closed:
            return
        if sub is not None:
            with contextlib.suppress(NatsError):
                await sub.unsubscribe()  # type: ignore[attr-defined]
        if name:
            with contextlib.suppress(NatsError, JetStreamError, TimeoutError):
                await asyncio.wait_for(self.js.delete_consumer(self.stream, name), CREATE_TIMEOUT_S)

    async def close(self) -> None:
        await self._drop()


async def read(js: JetStreamContext, stream: str, filters: list[str], *, start_seq: int = 1,
               follow: bool = False, last_per_subject: bool = False, near_leader: bool = False,
               prefix: str = READER) -> AsyncIterator[StoredMsg]:
    """Stored messages on `filters` in stream order. Without `follow` it stops once it has delivered
    everything that was in the stream when it started. With `near_leader`, on a cluster the consumer
    is placed on the stream leader's node: an R1 consumer on a random peer dies with that node even
    when the client and the stream leader live on. `prefix` picks the user's pool (READER, or
    FEED_READER on DTF_FEED)."""
    if last_per_subject:
        deliver, first = DeliverPolicy.LAST_PER_SUBJECT, None
    elif start_seq > 1:
        deliver, first = DeliverPolicy.BY_START_SEQUENCE, start_seq
    else:
        deliver, first = DeliverPolicy.ALL, None
    consumer = OrderedConsumer(js, stream, filters, prefix, deliver, first, near_leader)
    try:
        info = await consumer.open()
        remaining = info.num_pending
        while follow or remaining > 0:
            msg = await consumer.next()
            remaining = msg.pending
            yield msg
    finally:
        # The caller may stop early and close the connection before this generator is finalised.
        await consumer.close()
