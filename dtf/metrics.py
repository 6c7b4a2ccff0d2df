"""Prometheus metrics: what the coordinator, the projector and the workers share.

Each process declares its metrics once, as `Metric`s next to its own code (dtf/cli/coordinator_metrics.py,
dtf.workers.metrics, dtf.projections.metrics), and fills them from the state it already keeps, in a
custom collector evaluated at scrape time: nothing is counted on the hot paths. The same declarations
drive `dtf grafana`, so a dashboard panel can only name a metric some process exposes.

`Endpoint` serves /metrics from prometheus_client's HTTP server in a thread of its own, so a scrape
never runs on (or blocks) the process's asyncio loop; a collector that needs the bus asks the loop
with `on_loop` and waits in the scrape thread.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal, TypeVar

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("dtf.metrics")

T = TypeVar("T")

LOOP_TIMEOUT_S = 2.0
"""How long a scrape waits for an answer from the bus before leaving that metric out."""

DURATION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
"""Seconds: from a quick command to a six-hour benchmark."""


@dataclass(frozen=True)
class Metric:
    """One metric's declaration: what the collector emits and what a dashboard panel shows.

    `aggregate` is how a dashboard combines the series of several processes: "max" where each process
    computes the same number from the same log (coordinator replicas, projectors), "sum" where each
    counts its own share (workers)."""

    name: str
    kind: Literal["gauge", "counter", "histogram"]
    help: str
    labels: tuple[str, ...] = ()
    unit: str = "short"
    """Grafana unit of the panel: "short", "s", ..."""
    aggregate: Literal["max", "sum"] = "max"
    buckets: tuple[float, ...] = DURATION_BUCKETS

    def gauge(self) -> GaugeMetricFamily:
        assert self.kind == "gauge", self.name
        return GaugeMetricFamily(self.name, self.help, labels=self.labels)

    def counter(self) -> CounterMetricFamily:
        assert self.kind == "counter", self.name
        return CounterMetricFamily(self.name, self.help, labels=self.labels)

    def histogram(self) -> HistogramMetricFamily:
        assert self.kind == "histogram", self.name
        return HistogramMetricFamily(self.name, self.help, labels=self.labels)

    def add_series(self, family: HistogramMetricFamily, labels: list[str], cumulative: list[int], count: int,
                   total: float) -> None:
        """One histogram series from the counts at or below each of `buckets`, the count and the sum."""
        assert len(cumulative) == len(self.buckets), self.name
        pairs = [(repr(float(b)), n) for b, n in zip(self.buckets, cumulative, strict=True)]
        family.add_metric(labels, [*pairs, ("+Inf", count)], total)

    def live_histogram(self) -> Histogram:
        """A prometheus_client Histogram to observe into as things happen (not registered anywhere:
        the process's collector yields it)."""
        assert self.kind == "histogram", self.name
        return Histogram(self.name, self.help, self.labels, buckets=self.buckets, registry=None)

    @property
    def sample_names(self) -> tuple[str, ...]:
        """The names its samples carry in the exposition format (what PromQL refers to)."""
        if self.kind == "counter":
            return (f"{self.name}_total",)
        if self.kind == "histogram":
            return (f"{self.name}_bucket", f"{self.name}_sum", f"{self.name}_count")
        return (self.name,)


def on_loop(loop: asyncio.AbstractEventLoop, make: Callable[[], Awaitable[T]]) -> T | None:
    """Run a coroutine on the process's loop from a scrape thread and wait for it; None when the
    loop does not answer in LOOP_TIMEOUT_S (stopping, or the bus is away) or the call fails."""
    async def call() -> T:
        return await make()

    coroutine = call()
    try:
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
    except RuntimeError:  # the loop closed meanwhile: the process is stopping
        coroutine.close()
        return None
    try:
        return future.result(LOOP_TIMEOUT_S)
    except Exception as exc:  # noqa: BLE001 - a scrape leaves out what it cannot get, and says why
        future.cancel()
        log.debug("metrics: %s", exc or type(exc).__name__)
        return None


class Endpoint:
    """An HTTP server for /metrics in a thread of its own, bound on construction (so a taken port
    fails at start, not at the first scrape). It serves the process's CPU and memory at once; each
    collector `add`ed later joins them."""

    def __init__(self, host: str, port: int) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        ProcessCollector(registry=self.registry)
        self._added: list[Collector] = []
        self._server, self._thread = start_http_server(port, addr=host, registry=self.registry)
        self.host = host
        self.port = self._server.server_port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def add(self, collector: Collector) -> None:
        """Serve `collector`, in place of one of its kind added before: a service that connects
        afresh (dtf.cli.common.serve_with_nats) builds its state anew, and is scraped once."""
        for old in [c for c in self._added if type(c) is type(collector)]:
            self.registry.unregister(old)
            self._added.remove(old)
        self.registry.register(collector)
        self._added.append(collector)

    def close(self) -> None:
        """Stop serving (blocks for up to the server's 0.5 s poll: call it from a thread)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(LOOP_TIMEOUT_S)


def parse_address(value: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """`PORT` or `HOST:PORT` (`[::1]:PORT` for IPv6) -> (host, port); ValueError when it is neither.
    Port 0 lets the system pick a free port."""
    host, sep, port = value.rpartition(":")
    if not sep:
        host = default_host
    host = host.strip("[]") or default_host
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected PORT or HOST:PORT (port 0-65535), got {value!r}")
    return host, int(port)
