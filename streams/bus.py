"""Connecting to NATS, publishing events with their dedup and concurrency headers, reading streams.

Every process talks to the bus through these few functions so the headers that make the log safe
(Nats-Msg-Id for dedup, expected-last-subject-sequence for the coordinator's writes) are set the same
way everywhere. Every stream read goes through `read` (dtf.streams.reader: an ordered consumer under
a name from the user's own pool) or, for a long follow, `follow` around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable

import nats
from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.api import PubAck
from nats.js.errors import APIError
from nats.js.errors import Error as JetStreamError

from dtf import events as ev
from dtf import subjects
from dtf.streams.reader import StoredMsg, read  # bus.read and bus.StoredMsg, for every reader
from dtf.streams.retry import is_transient_publish_failure, retrying_publish

log = logging.getLogger("dtf.bus")

WRONG_LAST_SEQUENCE = 10071
"""JetStream's error code when an expected-last-subject-sequence check fails."""


class Conflict(Exception):
    """Another writer moved the task on first: our decision was made on stale state."""


class TooLarge(ValueError):
    """An event that, with its headers, exceeds what the server takes in one message. Refused here:
    nats-py checks only the payload, and the server closes a connection that sends more."""


def message_size(data: bytes, headers: dict[str, str]) -> int:
    """What the server counts against max_payload: the payload and the headers as nats-py frames
    them ("NATS/1.0\r\n", "key: value\r\n" each, then a blank line)."""
    return len(data) + 12 + sum(len(k.encode()) + len(v.encode()) + 4 for k, v in headers.items())


def encoded(js: JetStreamContext, event: ev.Event, headers: dict[str, str]) -> bytes:
    """The event's bytes, once they are known to fit the server's max_payload with `headers`."""
    data = ev.encode(event)
    size = message_size(data, headers)
    limit = js._nc.max_payload  # noqa: SLF001 - the server's own figure, from its INFO
    if size > limit:
        raise TooLarge(f"{type(event).__name__} {event.id} is {size} bytes with its headers; the server takes {limit}")
    return data


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
    attempts: int = 1,
) -> PubAck:
    """Publish one event on its subject. With `expected_seq`, the server refuses it (Conflict) unless
    the task's last message is still the one at that sequence. `timeout` bounds the wait for the ack
    (default: the JetStream context's). With `attempts` > 1 a transient failure is retried with
    back-off (a CLI's one-off publish); services keep the default, one attempt, because each has its
    own retry (the coordinator's next round, the worker's result loop, the next heartbeat)."""
    headers = headers_for(event, expected_seq)
    data = encoded(js, event, headers)
    try:
        # Same bytes and Nats-Msg-Id on every attempt, so a retry after a lost ack is deduplicated.
        return await retrying_publish(lambda: js.publish(
            subjects.subject_for(event), data, headers=headers,
            **({} if timeout is None else {"timeout": timeout}),
        ), attempts=attempts)
    except APIError as exc:
        if exc.err_code == WRONG_LAST_SEQUENCE:
            raise Conflict(str(exc)) from None
        raise


async def publish_many(js: JetStreamContext, events: Iterable[ev.Event], window: int = 512) -> list[PubAck]:
    """Pipelined publishes: up to `window` in flight, every ack awaited, failures raised."""
    pending: list[asyncio.Future[PubAck]] = []
    sent: list[tuple[str, bytes, dict[str, str]]] = []
    for event in events:
        headers = headers_for(event)
        sent.append((subjects.subject_for(event), encoded(js, event, headers), headers))
        pending.append(await js.publish_async(*sent[-1][:2], headers=headers))
        if len(pending) % window == 0:
            await asyncio.gather(*pending[-window:], return_exceptions=True)
    acks = await asyncio.gather(*pending, return_exceptions=True)
    # A failed ack (leader election, no responders) is published again, one at a time with back-off;
    # its Nats-Msg-Id is unchanged, so if the first copy did land the stream keeps only one.
    for i, ack in enumerate(acks):
        if isinstance(ack, BaseException):
            if not is_transient_publish_failure(ack):
                raise ack
            subject, data, headers = sent[i]
            acks[i] = await retrying_publish(lambda: js.publish(subject, data, headers=headers))  # noqa: B023
    return list(acks)


async def tail(js: JetStreamContext, stream: str, timeout: float = 2.0) -> int:
    """The stream's last sequence, or 0 when it does not answer in time (mid-election): for stall
    checks, where "cannot tell" must not count as "behind"."""
    try:
        return (await asyncio.wait_for(js.stream_info(stream), timeout)).state.last_seq
    except (NatsError, JetStreamError, TimeoutError):
        return 0


async def follow(
    js: JetStreamContext, stream: str, filters: list[str], where: Callable[[], dict],
    stalled: Callable[[], Awaitable[bool]], *, check_s: float = 1.0, setup_s: float = 5.0, idle: bool = False,
) -> AsyncIterator[StoredMsg | None]:
    """Follow `stream` for as long as the caller iterates, through bus trouble: a new ordered consumer
    (from `where()`, e.g. the sequence after the last one seen) whenever the follow fails, or goes
    quiet for `check_s` while `stalled()` says it should not be. After a node's loss an ordered
    consumer may stop delivering without an error; the reader notices only after a few missed
    heartbeats (dtf.streams.reader), `stalled()` sooner. Setting up a consumer may
    take longer than `check_s` (up to `setup_s` is not counted as quiet), or a slow setup would be
    abandoned again and again. With `idle`, a quiet check that finds no stall yields None (a tick
    for callers with work of their own to retry)."""
    while True:
        messages = read(js, stream, filters, follow=True, near_leader=True, **where())
        pending: asyncio.Future | None = None
        window = setup_s
        try:
            while True:
                pending = pending or asyncio.ensure_future(anext(messages))
                done, _ = await asyncio.wait({pending}, timeout=window)
                window = check_s
                if not done:
                    if await stalled():
                        log.warning("following %s stalled; following it anew", stream)
                        break
                    if idle:
                        yield None
                    continue
                msg, pending = pending.result(), None
                yield msg
        except (NatsError, JetStreamError, TimeoutError, StopAsyncIteration) as exc:
            log.warning("following %s failed (%s); following it anew", stream, exc)
            await asyncio.sleep(check_s / 5)
        finally:
            if pending is not None:
                pending.cancel()
                await asyncio.gather(pending, return_exceptions=True)
            with contextlib.suppress(Exception):
                await messages.aclose()
