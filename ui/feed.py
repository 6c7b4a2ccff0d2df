"""The dashboard's one live feed: an ordered consumer over DTF_EVENTS from sequence 1 and one over
DTF_HEARTBEATS (the newest per worker), folded into a `Board`.

One `Feed` serves every open tab of a dashboard process: a tab only reads the board (and the view
rows the app caches per board version), so ten tabs cost NATS and DuckDB what one does. A page
opened late sees everything, because the board is folded from the first event; the detector's
findings are events in the same log. Beyond the log it asks the projector's read model for the
flaky tests (a question about many runs' results), at most every few seconds and only after new
results, and, when someone drills down, for a task's stored test list and its full log.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable, Sequence

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError

from dtf import subjects, wire
from dtf.streams import bus, objects, topology
from dtf.ui.board import Board, Point, SeriesOf, Stored, metric_series

log = logging.getLogger("dtf.dashboard")

YIELD_EVERY = 500
"""Messages folded between yields to the loop while catching up (buffered messages do not yield)."""
RETRY_S = 1.0
HEARTBEAT_QUIET_S = 30.0
"""No heartbeat from any worker this long: follow DTF_HEARTBEATS anew (a stall, or no workers)."""
STOP_RETRY_S = 0.5
ASK_TIMEOUT_S = 3.0
FLAKY_EVERY_S = 10.0
FLAKY_LIMIT = 20

Forecaster = Callable[[Sequence[Point]], dict]
"""The detector's forecast of a series (`dtf forecast --json`'s shape); ValueError when it cannot."""


class Feed:
    """Follows the streams into `board` between `run()` and its stop; never raises on bad input."""

    def __init__(self, nc: Client, series_of: SeriesOf = metric_series, forecaster: Forecaster | None = None) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.board = Board(series_of)
        self.forecaster = forecaster
        self._forecasts: dict[str, tuple[str, asyncio.Future[dict | str]]] = {}
        """series -> (id of its newest result, the forecast or why there is none): one per new result."""
        self.heartbeats: dict[str, bytes] = {}
        """Each worker's newest heartbeat message, for replays (subject -> data)."""
        self.caught_up = asyncio.Event()
        self._stopping = False
        self.flaky: list[dict] = []
        """The read model's flaky tests (passed and failed on one commit), for the alerts."""

    async def run(self, stop: asyncio.Event) -> None:
        tasks = [
            asyncio.create_task(self._follow_events(), name="dashboard-events"),
            asyncio.create_task(self._follow_heartbeats(), name="dashboard-heartbeats"),
            asyncio.create_task(self._watch_flaky(), name="dashboard-flaky"),
        ]
        try:
            await stop.wait()
        finally:
            # nats-py swallows a cancellation that lands inside its flush() (the task then carries on),
            # so loops also check `_stopping`, and a task still running is cancelled again.
            self._stopping = True
            running = set(tasks)
            while running:
                for task in running:
                    task.cancel()
                _, running = await asyncio.wait(running, timeout=STOP_RETRY_S)

    async def _follow_events(self) -> None:
        tail = await self._tail(topology.EVENTS)
        if tail == 0:
            self.caught_up.set()
        folded = 0
        async def stalled() -> bool:
            return await bus.tail(self.js, topology.EVENTS) > self.board.last_seq

        async for message in bus.follow(self.js, topology.EVENTS, [subjects.TASKS, subjects.WORKERS],
                                        lambda: {"start_seq": self.board.last_seq + 1}, stalled):
            self.board.apply(message.subject, message.seq, message.data)
            if message.seq >= tail and message.pending == 0:
                self.caught_up.set()
            folded += 1
            if folded % YIELD_EVERY == 0:
                await asyncio.sleep(0)

    async def _follow_heartbeats(self) -> None:
        async def stalled() -> bool:  # heartbeats come every few seconds; a restart costs one read
            return True

        async for message in bus.follow(self.js, topology.HEARTBEATS, [subjects.HEARTBEATS],
                                        lambda: {"last_per_subject": True}, stalled, check_s=HEARTBEAT_QUIET_S):
            self.heartbeats[message.subject] = message.data
            self.board.apply_heartbeat(message.subject, message.data)

    async def _tail(self, stream: str) -> int:
        while True:
            try:
                return (await self.js.stream_info(stream)).state.last_seq
            except (NatsError, JetStreamError, TimeoutError) as exc:
                log.warning("cannot read %s yet (%s); retrying", stream, exc)
                await asyncio.sleep(RETRY_S)

    async def _watch_flaky(self) -> None:
        """Ask for flaky tests again after new results came in, at most every FLAKY_EVERY_S: one
        question per dashboard process, whatever the number of tabs. No projector: no flaky alerts."""
        asked_at_results = -1
        while not self._stopping:
            if len(self.board.results) != asked_at_results:
                asked_at_results = len(self.board.results)
                try:
                    body = await self.ask("flaky", {"limit": FLAKY_LIMIT})
                    self.flaky = [row for row in body.get("flaky", []) if isinstance(row, dict)]
                except LookupError as exc:
                    log.debug("flaky tests: %s", exc)
            await asyncio.sleep(FLAKY_EVERY_S)

    async def ask(self, name: str, request: dict) -> dict:
        """One read-model query's reply; LookupError saying why when there is none."""
        try:
            reply = await self.nc.request(subjects.query(name), json.dumps(request).encode(), timeout=ASK_TIMEOUT_S)
        except NoRespondersError:
            raise LookupError(f"nothing answers dtf.query.{name}") from None
        except (NatsError, TimeoutError) as exc:
            raise LookupError(f"dtf.query.{name} did not answer ({type(exc).__name__})") from None
        try:
            body = wire.decode(reply.data)
        except wire.WireError:
            raise LookupError(f"dtf.query.{name} answered something that is not JSON") from None
        if not isinstance(body, dict) or "error" in body:
            raise LookupError(str(body.get("error") if isinstance(body, dict) else body))
        return body

    async def forecast(self, key: str) -> dict | str:
        """A series' forecast, or why there is none: computed in a thread once per new result of the
        series, however many tabs ask (they await the same future)."""
        points = list(self.board.series.get(key, ()))
        if self.forecaster is None or not points:
            return "no forecast here"
        cached = self._forecasts.get(key)
        if cached is None or cached[0] != points[-1].result_id:
            cached = (points[-1].result_id, asyncio.ensure_future(self._forecast_now(points)))
            self._forecasts[key] = cached
        return await asyncio.shield(cached[1])

    async def _forecast_now(self, points: list[Point]) -> dict | str:
        assert self.forecaster is not None
        try:
            return await asyncio.to_thread(self.forecaster, points)
        except ValueError as exc:  # too short a history
            return f"no forecast: {exc}"
        except Exception as exc:  # noqa: BLE001 - a model failing on odd data must not break the page
            log.warning("forecast failed: %s: %s", type(exc).__name__, exc)
            return f"no forecast: {type(exc).__name__}"

    async def history(self, filters: list[str] | None = None, upto_seq: int | None = None) -> list[Stored]:
        """The stored log (every event, or those on `filters`) up to sequence `upto_seq`, read through an
        ordered consumer as `dtf replay` reads it: a replay asks the stream, so the feed keeps no copy."""
        found: list[Stored] = []
        reader = bus.read(self.js, topology.EVENTS, filters or [subjects.TASKS, subjects.WORKERS])
        async with contextlib.aclosing(reader) as messages:
            async for message in messages:
                if upto_seq is not None and message.seq > upto_seq:
                    break
                found.append(Stored(message.seq, message.subject, message.data))
                if len(found) % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
        return found

    async def tests_of(self, task_id: str) -> list[dict]:
        """A task's per-test results from the read model (which also has those kept in the store)."""
        body = await self.ask("results", {"task_id": task_id, "limit": 1000})
        return [row for row in body.get("results", []) if isinstance(row, dict)]

    async def output_of(self, task_id: str) -> str:
        """A finished task's output, as `dtf logs` prints it: the stored log, else the result's tail."""
        detail = self.board.results.get(task_id)
        if detail is None:
            return ""
        if detail.log_ref is None:
            return detail.output_tail
        bucket = topology.artifacts_bucket(detail.worker_id)  # the attempt's worker's: its ref names nothing else
        try:
            found = await objects.get(self.js, bucket, detail.log_ref)
        except NotFoundError:
            return f"(log {detail.log_ref} is gone from {bucket})\n{detail.output_tail}"
        except (NatsError, JetStreamError, TimeoutError) as exc:
            return f"(cannot fetch {detail.log_ref}: {type(exc).__name__})\n{detail.output_tail}"
        return found.decode("utf-8", "replace")
