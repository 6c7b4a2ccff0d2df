"""The coordinator process: a thin async shell around `dtf.state.Fold` and `dtf.schedule.decide`.

It keeps no state of its own: on start it folds DTF_EVENTS from the first message and each worker's
last heartbeat, then follows both. Whenever it has caught up with the log (and once a second, for
retry back-offs and heartbeat ages) it asks the pure scheduler what to do and publishes each decision
with the task's last stream sequence as the expected one, so when replicas race the server keeps the
first write and refuses the rest (`bus.Conflict`). It never applies its own decisions directly: they
count once they come back through the log, like everyone else's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from datetime import UTC, datetime

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError

from dtf import events as ev
from dtf import schedule, subjects
from dtf.state import Fold
from dtf.streams import bus, topology

log = logging.getLogger("dtf.coordinator")

TICK_S = 1.0
PUBLISH_WINDOW = 256
"""Decisions in flight at once."""


def default_name() -> str:
    return f"coord-{socket.gethostname()}-{os.getpid()}"


class Coordinator:
    def __init__(self, nc: Client, name: str | None = None, policy: schedule.Policy = schedule.Policy()) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.name = name or default_name()
        self.policy = policy
        self.fold = Fold()
        self.caught_up = asyncio.Event()
        self.changed = asyncio.Event()
        self.published = 0
        self.conflicts = 0
        self.tick = min(TICK_S, policy.heartbeat_timeout.total_seconds() / 5)
        """How often to decide with no news: retry back-offs and silent workers are found by time."""

    async def run(self, stop: asyncio.Event) -> None:
        info = await self.js.stream_info(topology.EVENTS)
        start_tail = info.state.last_seq
        if start_tail == 0:
            self.caught_up.set()
        tasks = [
            asyncio.create_task(self._follow_events(start_tail), name="coordinator-events"),
            asyncio.create_task(self._follow_heartbeats(), name="coordinator-heartbeats"),
            asyncio.create_task(self._decide_loop(), name="coordinator-decide"),
        ]
        log.info("coordinator %s folding %s from seq 1 (tail %d)", self.name, topology.EVENTS, start_tail)
        stopped = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopped, *tasks], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopped:
                    task.result()  # a crashed loop is a bug: surface it
        finally:
            for task in [stopped, *tasks]:
                task.cancel()
            await asyncio.gather(stopped, *tasks, return_exceptions=True)

    async def _follow_events(self, start_tail: int) -> None:
        async for msg in bus.read(self.js, topology.EVENTS, [subjects.TASKS, subjects.WORKERS], follow=True):
            self.fold.apply(msg.subject, msg.seq, msg.data)
            if msg.seq >= start_tail and msg.pending == 0:
                self.caught_up.set()
                self.changed.set()

    async def _follow_heartbeats(self) -> None:
        async for msg in bus.read(
            self.js, topology.HEARTBEATS, [subjects.HEARTBEATS], follow=True, last_per_subject=True
        ):
            try:
                event = ev.decode(msg.data)
            except ev.DecodeError as exc:
                log.warning("ignoring bad heartbeat on %s: %s", msg.subject, exc)
                continue
            if isinstance(event, ev.WorkerHeartbeat) and subjects.mismatch(event, msg.subject) is None:
                before = self.fold.workers.get(event.worker_id)
                self.fold.apply_event(event)
                after = self.fold.workers.get(event.worker_id)
                if before is None or after is None or before.status != after.status:
                    self.changed.set()  # a worker came back: it may take work now

    async def _decide_loop(self) -> None:
        await self.caught_up.wait()
        while True:
            try:
                await asyncio.wait_for(self.changed.wait(), self.tick)
            except TimeoutError:
                pass
            self.changed.clear()
            highest = await self._publish_decisions()
            # Decide again only on a state that includes our own writes (or others' that beat them).
            while highest and self.fold.last_seq < highest:
                self.changed.clear()
                try:
                    await asyncio.wait_for(self.changed.wait(), self.tick)
                except TimeoutError:
                    break

    async def _publish_decisions(self) -> int:
        """Publish this round's decisions, pipelined (each concerns its own task subject, so their
        order does not matter); returns the highest sequence stored."""
        decisions = list(schedule.decide(self.fold, datetime.now(UTC), self.name, self.policy))
        highest = 0
        for start in range(0, len(decisions), PUBLISH_WINDOW):
            window = decisions[start:start + PUBLISH_WINDOW]
            highest = max([highest, *await asyncio.gather(*map(self._publish_one, window))])
        return highest

    async def _publish_one(self, decision: ev.Event) -> int:
        expected = (
            self.fold.task_seq.get((decision.run_id, decision.task_id), 0)
            if isinstance(decision, ev.TaskEvent) else None
        )
        try:
            ack = await bus.publish(self.js, decision, expected_seq=expected)
        except bus.Conflict:
            self.conflicts += 1
            log.debug("lost the race for %s %s", type(decision).__name__, decision.id)
            return 0
        except (NatsError, JetStreamError, TimeoutError) as exc:
            log.warning("publishing %s failed (%s); retrying next round", decision.id, exc)
            return 0
        if ack.duplicate:
            return 0  # another replica stored this very decision first
        self.published += 1
        if isinstance(decision, ev.TaskAssigned):
            log.info("task %s attempt %d -> %s", decision.task_id, decision.attempt, decision.worker_id)
        elif isinstance(decision, (ev.WorkerLost, ev.TaskFailed)):
            log.warning("%s: %s", type(decision).__name__, decision.reason)
        return ack.seq
