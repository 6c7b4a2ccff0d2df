"""The live projector: durable consumers on DTF_EVENTS and DTF_HEARTBEATS into the DuckDB read model,
plus the query service that answers the CLI from it.

    run_projector(nc, db_path, stop)

One loop per stream fetches up to `batch` messages (a short fetch timeout: nothing new is not an
error; once something came, it lingers up to LINGER_S for more, because a DuckDB transaction costs
about the same for 5 rows as for 500, so a busy bus is written in few big batches, for a read model
at most 0.1 s later), fetches the test lists those results keep in the artifacts store, applies the
batch in one DuckDB transaction in a worker thread (never on the event loop) and then acks each
message. Acks come after the commit, so a crash redelivers at most a committed batch, which the
checkpoint and the event ledger make harmless. A batch that fails is nak'd and retried; the loops
never die on an error.

On `stop`, each loop finishes the batch in hand (an outstanding fetch ends within its timeout and
its messages are applied too), then every task is cancelled and the database closed.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from dtf.metrics import Endpoint
from dtf.projections import artifacts, consumers, metrics as projector_metrics
from dtf.projections.projection import BatchResult, Message, Projection
from dtf.projections.service import QueryService, serve
from dtf.streams.bus import StoredMsg
from dtf.streams.topology import EVENTS, HEARTBEATS, PROJECTOR

__all__ = ["BatchResult", "Message", "Projection", "run_projector"]

log = logging.getLogger("dtf.projector")

BATCH = 500
FETCH_TIMEOUT_S = 1.0
LINGER_S = 0.1
RETRY_DELAY_S = 1.0
HOLD_DELAY_S = 1.0
"""How long a message that arrived after a gap waits before it is offered again."""
STOP_GRACE_S = 60.0


async def run_projector(
    nc: Client, db_path: str | Path, stop: asyncio.Event, *, name: str = PROJECTOR, batch: int = BATCH,
    fetch_timeout: float = FETCH_TIMEOUT_S, metrics: Endpoint | None = None,
) -> None:
    """Project both streams into the database at `db_path` and answer queries until `stop` is set.
    The streams must exist (`dtf.streams.topology.provision`). The durable consumers `name` and
    `<name>-hb` are created here; each projector (each database) needs its own name. With `metrics`,
    the read model's metrics are served there while the database is open."""
    js = nc.jetstream()
    projection = await asyncio.to_thread(Projection.open, db_path)
    collector = projector_metrics.expose(metrics, projection, js) if metrics is not None else None
    service: QueryService | None = None
    loops: list[asyncio.Task[None]] = []
    try:
        service = await serve(nc, projection.con)
        loops = [
            asyncio.create_task(
                _consume(js, projection, stream, stop, name, batch, fetch_timeout),
                name=f"{name}-{stream}",
            )
            for stream in (EVENTS, HEARTBEATS)
        ]
        await stop.wait()
        await asyncio.wait(loops, timeout=fetch_timeout + STOP_GRACE_S)
    finally:
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if service is not None:
            await service.close()
        if collector is not None:
            await asyncio.to_thread(collector.close)  # waits for a scrape reading the database
        # Waits (in its thread) for a batch whose thread outlived a cancelled loop.
        await asyncio.to_thread(projection.close)


async def _consume(
    js: JetStreamContext, projection: Projection, stream: str, stop: asyncio.Event, name: str,
    batch: int, fetch_timeout: float,
) -> None:
    """Fetch, apply, ack until `stop`; every error is logged and retried after a pause."""
    psub = None
    try:
        while not stop.is_set():
            _raise_if_cancelled()
            try:
                if psub is None:
                    durable = await consumers.ensure_consumer(js, stream, projection.checkpoint(stream), name)
                    psub = await js.pull_subscribe_bind(durable=durable, stream=stream)
                try:
                    msgs = await psub.fetch(batch, timeout=fetch_timeout)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                msgs += await _more(psub, batch - len(msgs), LINGER_S, stop)
                await _handle(js, projection, stream, msgs)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the projector outlives any one failure
                log.warning("%s: %s: %s; retrying", stream, type(exc).__name__, exc)
                if psub is not None:
                    await _unsubscribe(psub)
                    psub = None
                try:
                    await asyncio.wait_for(stop.wait(), RETRY_DELAY_S)
                except TimeoutError:
                    pass
    finally:
        if psub is not None:
            await _unsubscribe(psub)


async def _more(psub: JetStreamContext.PullSubscription, room: int, linger: float,
                stop: asyncio.Event) -> list[Msg]:
    """What else arrives within `linger` seconds, up to `room` messages (none once stopping)."""
    more: list[Msg] = []
    deadline = asyncio.get_running_loop().time() + linger
    while len(more) < room and not stop.is_set():
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0.001:
            break
        try:
            more += await psub.fetch(room - len(more), timeout=left)
        except (TimeoutError, nats.errors.TimeoutError):
            break
    return more


async def _handle(js: JetStreamContext, projection: Projection, stream: str, msgs: list[Msg]) -> None:
    """Apply one fetched batch and settle every message of it: ack, or nak to see it again."""
    ready = [StoredMsg(stream, _seq(m), m.subject, m.data) for m in msgs]
    held: list[StoredMsg] = []
    try:
        if stream == EVENTS:
            ready, held = await consumers.in_order(js, ready, projection.checkpoint(stream))
        tests = await artifacts.fetch_tests(js, ready)
        future = asyncio.ensure_future(asyncio.to_thread(projection.apply_batch, ready, tests))
        result = await asyncio.shield(future)
    except BaseException:
        await _settle(msgs, nak=True)
        raise
    waiting = {m.seq for m in held}
    await _settle([m for m in msgs if _seq(m) not in waiting])
    await _settle([m for m in msgs if _seq(m) in waiting], nak=True)
    if result.invalid or result.duplicates:
        log.info("%s: %s", stream, result.as_dict())


def _raise_if_cancelled() -> None:
    """Python 3.11's asyncio.wait_for (inside nats-py's fetch) can turn a cancellation that races its
    timeout into a TimeoutError; the task still counts the cancel request, so honour it here."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _seq(msg: Msg) -> int:
    return msg.metadata.sequence.stream


async def _settle(msgs: list[Msg], nak: bool = False) -> None:
    for msg in sorted(msgs, key=_seq):
        try:
            if nak:
                await msg.nak(delay=HOLD_DELAY_S)
            else:
                await msg.ack()
        except Exception as exc:  # noqa: BLE001 - an unacked message is redelivered, and skipped
            log.debug("settle %s: %s", msg.subject, exc)


async def _unsubscribe(psub: JetStreamContext.PullSubscription) -> None:
    try:
        await psub.unsubscribe()
    except Exception as exc:  # noqa: BLE001
        log.debug("unsubscribe: %s", exc)
