"""The projector's Prometheus metrics, queried from its DuckDB read model at scrape time (on a cursor
of its own, in the metrics server's thread, so neither the event loop nor the writer waits):

    events consumed   the event ledger by type (every admitted DTF_EVENTS message, applied or not),
                      invalid messages, the checkpoint per stream and how far it trails the stream
    detections        AnomalyDetected / RegressionDetected (any `*Detected` event type) in the ledger
    latency           submission to first start, and each attempt's run time, as histograms per task type

All of it is a function of the event log, so two projectors report the same numbers and a rebuilt one
starts where the live one was: the histograms are recomputed whole from the tables at each scrape.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

from dtf.projections.projection import Projection
from dtf.streams.topology import EVENTS, HEARTBEATS
from nats.js import JetStreamContext
from prometheus_client.core import Metric as Family
from prometheus_client.registry import Collector

from dtf import events as ev
from dtf.metrics import Endpoint, Metric, on_loop

EVENTS_CONSUMED = Metric(
    "dtf_projector_events", "counter", "DTF_EVENTS events in the read model's ledger, by type.", ("type",))
INVALID = Metric(
    "dtf_projector_invalid_events", "counter", "Messages the read model could not accept, by stream.",
    ("stream",))
CHECKPOINT = Metric("dtf_projector_checkpoint", "gauge", "Last stream sequence committed to the read model.",
                    ("stream",))
LAG = Metric("dtf_projector_lag_events", "gauge",
             "Stream messages not yet in the read model (consumer lag), by stream.", ("stream",))
DETECTIONS = Metric(
    "dtf_detections", "counter", "Anomalies and regressions detected, by event type.", ("type",))
WAIT_SECONDS = Metric(
    "dtf_task_wait_seconds", "histogram",
    "Seconds from a task's submission to the start of its first attempt.",
    ("type",), unit="s")
RUN_SECONDS = Metric(
    "dtf_attempt_run_seconds", "histogram", "Seconds an attempt ran, as its result reports, by task type.",
    ("type",), unit="s")

METRICS: tuple[Metric, ...] = (
    EVENTS_CONSUMED, INVALID, CHECKPOINT, LAG, DETECTIONS, WAIT_SECONDS, RUN_SECONDS,
)

DETECTION_TYPES: tuple[str, ...] = tuple(sorted(name for name in ev.EVENT_TYPES if name.endswith("Detected")))
STREAMS = (EVENTS, HEARTBEATS)

_WAITS = """
    SELECT t.type, greatest(0, epoch(min(a.started_at)) - epoch(t.submitted_at)) AS value
    FROM tasks t JOIN attempts a USING (task_id)
    WHERE a.started_at IS NOT NULL AND t.submitted_at IS NOT NULL
    GROUP BY t.task_id, t.type, t.submitted_at
"""
_RUNS = """
    SELECT t.type, a.duration_s AS value
    FROM attempts a JOIN tasks t USING (task_id)
    WHERE a.duration_s IS NOT NULL
"""


def _histogram_sql(metric: Metric, observations: str) -> str:
    """Per task type: observations at or below each bucket, their count and sum, in one scan."""
    buckets = ", ".join(f"count(*) FILTER (WHERE value <= {float(b)!r})" for b in metric.buckets)
    return (f"SELECT coalesce(type, 'unknown'), {buckets}, count(*), sum(value) FROM ({observations})"
            " GROUP BY ALL ORDER BY 1")


class ProjectorCollector(Collector):
    """Reads `projection`'s tables; `close` waits for a scrape in progress and turns later ones away,
    so the projector can close the database without a scrape racing it."""

    def __init__(self, projection: Projection, js: JetStreamContext, loop: asyncio.AbstractEventLoop) -> None:
        self.projection = projection
        self.js = js
        self.loop = loop
        self._lock = threading.Lock()
        self._closed = False

    def close(self) -> None:
        with self._lock:
            self._closed = True

    def collect(self) -> Iterator[Family]:
        tails = {stream: on_loop(self.loop, lambda s=stream: self._tail(s)) for stream in STREAMS}
        with self._lock:
            if self._closed:
                return []
            cur = self.projection.con.cursor()
            try:
                return list(self._families(cur, tails))
            finally:
                cur.close()

    def _families(self, cur, tails: dict[str, int | None]) -> Iterator[Family]:  # noqa: ANN001 - a DuckDB cursor
        by_type = dict(cur.execute(
            "SELECT type, count(*) FROM events WHERE stream = $s GROUP BY type ORDER BY type", {"s": EVENTS},
        ).fetchall())
        family = EVENTS_CONSUMED.counter()
        for name, count in by_type.items():
            family.add_metric([name], count)
        yield family
        family = DETECTIONS.counter()
        for name in DETECTION_TYPES:
            family.add_metric([name], by_type.get(name, 0))
        yield family

        invalid = dict(cur.execute("SELECT stream, count(*) FROM invalid_events GROUP BY stream").fetchall())
        checkpoints = dict(cur.execute("SELECT stream, seq FROM checkpoints").fetchall())
        family, checkpoint, lag = INVALID.counter(), CHECKPOINT.gauge(), LAG.gauge()
        for stream in STREAMS:
            family.add_metric([stream], invalid.get(stream, 0))
            checkpoint.add_metric([stream], checkpoints.get(stream, 0))
            if tails[stream] is not None:  # the bus did not answer in time: no number rather than a wrong one
                lag.add_metric([stream], max(0, tails[stream] - checkpoints.get(stream, 0)))
        yield from (family, checkpoint, lag)

        for metric, observations in ((WAIT_SECONDS, _WAITS), (RUN_SECONDS, _RUNS)):
            family = metric.histogram()
            rows = cur.execute(_histogram_sql(metric, observations)).fetchall()
            for task_type, *cumulative, count, total in rows:
                metric.add_series(family, [task_type], cumulative, count, total or 0.0)
            yield family

    async def _tail(self, stream: str) -> int:
        return (await self.js.stream_info(stream)).state.last_seq


def expose(endpoint: Endpoint, projection: Projection, js: JetStreamContext) -> ProjectorCollector:
    """Serve `projection`'s metrics on `endpoint` (from the projector's event loop) until `close`."""
    collector = ProjectorCollector(projection, js, asyncio.get_running_loop())
    endpoint.add(collector)
    return collector
