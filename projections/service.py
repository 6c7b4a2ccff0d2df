"""The query service: NATS request-reply in front of the projector's DuckDB file.

DuckDB locks its file against every other process, readers included, so the process that projects
also answers: it subscribes to `dtf.query.<name>` in queue group "projector" (several projectors
would share the load) and runs each query in a worker thread on its own cursor, never on the event
loop and never blocking the writer. Nothing a client sends can stop the service: every failure is
an {"error": ...} reply.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial

import duckdb
import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from dtf import subjects
from dtf.projections import logs, queries

log = logging.getLogger("dtf.projector.queries")

QUEUE = "projector"


class QueryService:
    """Subscribed between `start()` and `close()`; `close` waits for the queries in flight."""

    def __init__(self, nc: Client, con: duckdb.DuckDBPyConnection) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.con = con
        self._subs: list[Subscription] = []
        self._inflight: set[asyncio.Future[bytes]] = set()

    async def start(self) -> QueryService:
        for name in queries.QUERIES:
            self._subs.append(await self.nc.subscribe(
                subjects.query(name), queue=QUEUE, cb=partial(self._handle, name),
            ))
            # A submitter's own: dtf.query.<name>.<submitter>. Every query, so one a submitter may
            # not ask is refused in words rather than met by silence ("no responders").
            self._subs.append(await self.nc.subscribe(
                subjects.query(name, "*"), queue=QUEUE, cb=partial(self._handle, name),
            ))
        # Only ever a submitter's own (an admin or viewer reads the artifacts store itself).
        self._subs.append(await self.nc.subscribe(
            subjects.query("log", "*"), queue=QUEUE, cb=partial(self._handle, "log"),
        ))
        await self.nc.flush()
        return self

    async def _handle(self, name: str, msg: Msg) -> None:
        if not msg.reply:
            return
        try:
            # A task of its own, shielded: if this callback is cancelled (close), the thread's
            # result is still awaited by close() before the connection goes away.
            party = msg.subject.split(".")[3] if msg.subject.count(".") == 3 else None
            work = logs.answer(self.js, self.con, msg.data, party) if name == "log" and party \
                else asyncio.to_thread(queries.answer, self.con, name, msg.data, party)
            future = asyncio.ensure_future(work)
            self._inflight.add(future)
            future.add_done_callback(self._inflight.discard)
            reply = await asyncio.shield(future)
            if len(reply) > self.nc.max_payload:
                reply = msgspec.json.encode(
                    {"error": f"reply of {len(reply)} bytes is over the limit; ask with a smaller limit"}
                )
            await msg.respond(reply)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - keep serving whatever one request did
            log.warning("query %s: %s", name, exc)

    async def close(self) -> None:
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # noqa: BLE001 - the connection may already be closed
                log.debug("unsubscribe: %s", exc)
        self._subs.clear()
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)


async def serve(nc: Client, con: duckdb.DuckDBPyConnection) -> QueryService:
    """Start answering queries on `con`'s database."""
    return await QueryService(nc, con).start()
