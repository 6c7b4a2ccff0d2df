"""Connecting to NATS, publishing events with their dedup and concurrency headers, reading streams.

Every process talks to the bus through these few functions so the headers that make the log safe
(Nats-Msg-Id for dedup, expected-last-subject-sequence for the coordinator's writes) are set the same
way everywhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy, PubAck
from nats.js.errors import APIError

from dtf import events as ev
from dtf import subjects

log = logging.getLogger("dtf.bus")

WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code when an expected-last-subject-sequence check fails."""


class Conflict(Exception):
    """Another writer moved the task on first: our decision was made on stale state."""


async def connect(url: str, name: str, creds: str | None = None, **options) -> Client:
    """A client that keeps reconnecting and logs connection trouble instead of printing tracebacks.
    `url` may list several servers separated by commas (the nodes of a cluster)."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    async def on_disconnect() -> None:
        log.debug("nats: disconnected from %s", url)

    servers = [u.strip() for u in url.split(",") if u.strip()]  # a cluster: any node will do
    settings = dict(
        name=name, user_credentials=creds, error_cb=on_error, disconnected_cb=on_disconnect,
        max_reconnect_attempts=-1, reconnect_time_wait=0.5, connect_timeout=3, allow_reconnect=True,
    )
    return await nats.connect(servers, **{**settings, **options})


def headers_for(event: ev.Event, expected_seq: int | None = None) -> dict[str, str]:
    headers = {"Nats-Msg-Id": event.id}
    if expected_seq is not None and isinstance(event, ev.TaskEvent):
        headers["Nats-Expected-Last-Subject-Sequence"] = str(expected_seq)
        headers["Nats-Expected-Last-Subject-Sequence-Subject"] = subjects.task_all(
            event.run_id, event.task_id
        )
    return headers


async def publish(
    js: JetStreamContext, event: ev.Event, expected_seq: int | None = None, timeout: float | None = None,
) -> PubAck:
    """Publish one event on its subject. With `expected_seq`, the server refuses it (Conflict) unless
    the task's last message is still the one at that sequence. `timeout` bounds the wait for the ack
    (default: the JetStream context's)."""
    try:
        return await js.publish(
            subjects.subject_for(event), ev.encode(event), headers=headers_for(event, expected_seq),
            **({} if timeout is None else {"timeout": timeout}),
        )
    except APIError as exc:
        if exc.err_code == WRONG_LAST_SEQUENCE:
            raise Conflict(str(exc)) from None
        raise


async def publish_many(js: JetStreamContext, events: Iterable[ev.Event], window: int = 512) -> list[PubAck]:
    """Pipelined publishes: up to `window` in flight, every ack awaited, failures raised."""
    pending: list[asyncio.Future[PubAck]] = []
    for event in events:
        pending.append(await js.publish_async(
            subjects.subject_for(event), ev.encode(event), headers=headers_for(event),
        ))
        if len(pending) % window == 0:
            await asyncio.gather(*pending[-window:])
    return list(await asyncio.gather(*pending))


@dataclass(frozen=True)
class StoredMsg:
    stream: str
    seq: int
    subject: str
    data: bytes
    pending: int = 0
    """Messages still to come after this one when it was delivered: 0 means caught up."""


async def read(
    js: JetStreamContext, stream: str, filters: list[str], *, start_seq: int = 1,
    follow: bool = False, last_per_subject: bool = False,
) -> AsyncIterator[StoredMsg]:
    """Stored messages in stream order through an ordered consumer. Without `follow` it stops once it
    has delivered everything that was in the stream when it started."""
    config = ConsumerConfig(filter_subjects=filters, inactive_threshold=60.0)
    if last_per_subject:
        config.deliver_policy = DeliverPolicy.LAST_PER_SUBJECT
    elif start_seq > 1:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = start_seq
    sub = await js.subscribe(
        filters[0], stream=stream, ordered_consumer=True, config=config, idle_heartbeat=2.0,
        pending_msgs_limit=1_000_000, pending_bytes_limit=1024 * 1024 * 1024,
    )
    try:
        info = await sub.consumer_info()
        # Messages may already sit in our buffer (delivered) when we ask, so "nothing to read" is
        # only when none is pending on the server and none was delivered yet.
        remaining = info.num_pending + info.delivered.consumer_seq
        while follow or remaining > 0:
            msg: Msg = await sub.next_msg(timeout=None)
            meta = msg.metadata
            remaining = meta.num_pending
            yield StoredMsg(stream, meta.sequence.stream, msg.subject, msg.data, remaining)
    finally:
        # The caller may stop early and close the connection before this generator is finalised.
        with contextlib.suppress(NatsError):
            await sub.unsubscribe()
