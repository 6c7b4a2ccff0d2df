"""A worker's Prometheus metrics: its slots and what holds them (read from the agent at scrape time),
the assignments waiting in its durable consumer (its consumer lag), and how long each assignment
kept the worker busy (observed through the agent's `attempt_ended` hook as attempts end).

Every series carries `worker_id`, so dashboards sum over workers or show each one.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

from dtf.streams import topology
from dtf.workers.agent import WorkerAgent
from prometheus_client.core import Metric as Family
from prometheus_client.registry import Collector

from dtf.metrics import Metric, on_loop

CONCURRENCY = Metric(
    "dtf_worker_concurrency", "gauge", "Attempts the worker runs at once (its slots).", ("worker_id",),
    aggregate="sum")
RUNNING = Metric(
    "dtf_worker_running", "gauge", "Attempts holding a slot on the worker.", ("worker_id",), aggregate="sum")
PENDING = Metric(
    "dtf_worker_pending_assignments", "gauge",
    "Assignments stored for the worker and not yet delivered to it (its consumer lag).", ("worker_id",),
    aggregate="sum")
ATTEMPT_SECONDS = Metric(
    "dtf_worker_attempt_seconds", "histogram",
    "Seconds from taking an assignment to acking it (workspace, run and report), per ended attempt.",
    ("worker_id",), unit="s", aggregate="sum")

METRICS: tuple[Metric, ...] = (CONCURRENCY, RUNNING, PENDING, ATTEMPT_SECONDS)


class WorkerCollector(Collector):
    """Hooks into `agent` (its `attempt_ended`) and reads it from the metrics server's thread."""

    def __init__(self, agent: WorkerAgent, loop: asyncio.AbstractEventLoop) -> None:
        self.agent = agent
        self.loop = loop
        self.attempt_seconds = ATTEMPT_SECONDS.live_histogram()
        agent.attempt_ended = self.attempt_seconds.labels(agent.worker_id).observe

    def collect(self) -> Iterator[Family]:
        worker = [self.agent.worker_id]
        attempts = list(self.agent.attempts.values())  # one C-level copy: the loop may add one meanwhile
        for metric, value in ((CONCURRENCY, self.agent.concurrency),
                              (RUNNING, sum(1 for a in attempts if not a.reported))):
            family = metric.gauge()
            family.add_metric(worker, value)
            yield family
        pending = on_loop(self.loop, self._pending)
        if pending is not None:
            family = PENDING.gauge()
            family.add_metric(worker, pending)
            yield family
        yield from self.attempt_seconds.collect()

    async def _pending(self) -> int:
        durable = topology.worker_consumer(self.agent.worker_id).durable_name
        return (await self.agent.js.consumer_info(topology.EVENTS, durable)).num_pending
