"""The coordinator process: a thin async shell around `dtf.state.Fold` and `dtf.schedule.decide`.

It keeps no state of its own: on start it folds DTF_EVENTS from the first message and each worker's
last heartbeat, then follows both. Whenever it has caught up with the log (and once a second, for
retry back-offs, heartbeat ages and start deadlines) it asks the pure scheduler what to do and publishes each decision
with the task's last stream sequence as the expected one, so when replicas race the server keeps the
first write and refuses the rest (`bus.Conflict`). It never applies its own decisions directly: they
count once they come back through the log, like everyone else's.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
from datetime import UTC, datetime

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NoStreamResponseError, ServiceUnavailableError

from dtf import events as ev
from dtf import schedule, subjects
from dtf.state import Fold
from dtf.streams import buckets, bus, placement, topology
from dtf.streams.feed import OwnerFeed, reader_of

log = logging.getLogger("dtf.coordinator")

TICK_S = 1.0
PUBLISH_TIMEOUT_S = 2.0
"""A decision not acked by then is retried next round (same id: deduplicated if it was stored)."""
PLACEMENT_CHECK_S = 3.0
"""How often (jittered) a replica checks that the cluster's leaders are together."""
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
        self.feed = OwnerFeed(self.js)
        """Each owned run's events again, for its submitter to follow (dtf.streams.feed)."""
        self.caught_up = asyncio.Event()
        self.changed = asyncio.Event()
        self.published = 0
        self.conflicts = 0
        self.tick = min(TICK_S, policy.heartbeat_timeout.total_seconds() / 5,
                        policy.start_deadline.total_seconds() / 5)
        """How often to decide with no news: retry back-offs, silent workers and attempts not started
        in time are found by time."""
        self.bus_trouble = False
        self.bus_ok_since = datetime.now(UTC)
        """Since when the bus has worked for us: a worker's silence only counts from then on (a stream
        leader election stops every heartbeat for 4-9 s; that is not the workers' fault)."""
        self.heartbeat_seen = self.bus_ok_since
        """When the last heartbeat message reached us (any worker's)."""

    async def run(self, stop: asyncio.Event) -> None:
        info = await self.js.stream_info(topology.EVENTS)
        start_tail = info.state.last_seq
        if start_tail == 0:
            self.caught_up.set()
        await self.feed.resume()
        tasks = [
            asyncio.create_task(self.feed.run(), name="coordinator-feed"),
            asyncio.create_task(self._follow_events(start_tail), name="coordinator-events"),
            asyncio.create_task(self._follow_heartbeats(), name="coordinator-heartbeats"),
            asyncio.create_task(self._decide_loop(), name="coordinator-decide"),
            asyncio.create_task(self._keep_leaders_together(), name="coordinator-placement"),
            asyncio.create_task(buckets.serve(self.nc, self.js), name="coordinator-buckets"),
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
        async def stalled() -> bool:
            return await bus.tail(self.js, topology.EVENTS) > self.fold.last_seq

        def where() -> dict:
            return {"start_seq": self.fold.last_seq + 1}

        async for msg in bus.follow(self.js, topology.EVENTS, [subjects.TASKS, subjects.WORKERS], where, stalled):
            applied = self.fold.apply(msg.subject, msg.seq, msg.data)
            self.feed.offer(msg.subject, msg.seq, msg.data, reader_of(msg.subject, applied.event, self.fold.owners))
            if msg.seq >= start_tail and msg.pending == 0:
                self.caught_up.set()
                self.changed.set()

    async def _follow_heartbeats(self) -> None:
        async def stalled() -> bool:  # workers beat every few seconds: this long a silence is ours
            return datetime.now(UTC) - self.heartbeat_seen > 3 * self.policy.heartbeat_timeout

        async for msg in bus.follow(self.js, topology.HEARTBEATS, [subjects.HEARTBEATS],
                                    lambda: {"last_per_subject": True}, stalled):
            try:
                event = ev.decode(msg.data)
            except ev.DecodeError as exc:
                log.warning("ignoring bad heartbeat on %s: %s", msg.subject, exc)
                continue
            self.heartbeat_seen = datetime.now(UTC)
            if isinstance(event, ev.WorkerHeartbeat) and subjects.mismatch(event, msg.subject) is None:
                before = self.fold.workers.get(event.worker_id)
                self.fold.apply_event(event)
                after = self.fold.workers.get(event.worker_id)
                if before is None or after is None or before.status != after.status:
                    self.changed.set()  # a worker came back: it may take work now

    async def _keep_leaders_together(self) -> None:
        """On a cluster, keep every Raft group dtf needs led by the DTF_EVENTS leader (see
        dtf.streams.placement): then a follower node's loss stalls nothing."""
        misplaced: frozenset[str] = frozenset()
        while True:
            await asyncio.sleep(PLACEMENT_CHECK_S * random.uniform(0.75, 1.25))
            misplaced = await placement.colocate(self.nc, self.js, misplaced)

    async def _decide_loop(self) -> None:
        await self.caught_up.wait()
        while True:
            await self._news_or_tick()
            self.changed.clear()
            highest = await self._publish_decisions()
            # Decide again only on a state that includes our own writes (or others' that beat them).
            while highest and self.fold.last_seq < highest:
                self.changed.clear()
                if not await self._news_or_tick():
                    break

    async def _news_or_tick(self) -> bool:
        """Wait for news, at most a tick; whether news came. (asyncio.timeout, not wait_for: on
        Python 3.11 wait_for can swallow a cancellation that lands as the event is set.)"""
        try:
            async with asyncio.timeout(self.tick):
                await self.changed.wait()
        except TimeoutError:
            return False
        return True

    async def _publish_decisions(self) -> int:
        """Publish this round's decisions, pipelined (each concerns its own task subject, so their
        order does not matter); returns the highest sequence stored."""
        now = datetime.now(UTC)
        decisions = list(schedule.decide(self.fold, now, self.name, self.policy))
        if any(isinstance(d, ev.WorkerLost) for d in decisions):
            decisions = await self._hold_losses_during_bus_trouble(decisions, now)
        decisions = [d for d in decisions if not self._assigned_after_loss(d)]
        highest = 0
        for start in range(0, len(decisions), PUBLISH_WINDOW):
            window = decisions[start:start + PUBLISH_WINDOW]
            highest = max([highest, *await asyncio.gather(*map(self._publish_one, window))])
        return highest

    async def _hold_losses_during_bus_trouble(self, decisions: list[ev.Event], now: datetime) -> list[ev.Event]:
        """Drop WorkerLost decisions while heartbeats may not have been storable: the heartbeat
        stream has no leader now, or the bus came back less than a heartbeat timeout ago, or since
        it came back no heartbeat at all reached us yet (for at most 3 timeouts: all may be dead)."""
        try:
            info = await asyncio.wait_for(self.js.stream_info(topology.HEARTBEATS), 2.0)
            answering = info.cluster is None or bool(info.cluster.leader)
        except (NatsError, JetStreamError, TimeoutError):
            answering = False
        if not answering:
            self.bus_trouble = True
        elif self.bus_trouble:
            self._bus_back(now)
        timeout = self.policy.heartbeat_timeout
        since = now - self.bus_ok_since
        silent = now - self.heartbeat_seen  # no worker's heartbeat reaches us: likely our feed, not them
        if not self.bus_trouble and since > timeout and (self.heartbeat_seen > self.bus_ok_since or since > 3 * timeout) \
                and (silent <= timeout or silent > 3 * timeout):
            return decisions
        held = [d for d in decisions if isinstance(d, ev.WorkerLost)]
        log.info("holding %d WorkerLost decision(s): the bus was in trouble", len(held))
        return [d for d in decisions if not isinstance(d, ev.WorkerLost)]

    def _assigned_after_loss(self, decision: ev.Event) -> bool:
        """A lost-attempt TaskFailed for an assignment made after the worker's loss: whoever assigned
        it saw the worker back (a heartbeat this replica has not folded yet), so it is not lost."""
        if not (isinstance(decision, ev.TaskFailed) and decision.category == "worker"):
            return False
        task = self.fold.tasks.get(decision.task_id)
        worker = self.fold.workers.get(decision.worker_id)
        return (task is not None and worker is not None and worker.status == "lost"
                and task.assigned_at is not None and worker.lost_at is not None
                and task.assigned_at > worker.lost_at)

    def _bus_back(self, now: datetime) -> None:
        self.bus_trouble = False
        self.bus_ok_since = now

    async def _publish_one(self, decision: ev.Event) -> int:
        expected = (
            self.fold.task_seq.get((decision.run_id, decision.task_id), 0)
            if isinstance(decision, ev.TaskEvent) else None
        )
        try:
            ack = await bus.publish(self.js, decision, expected_seq=expected, timeout=PUBLISH_TIMEOUT_S)
        except bus.Conflict:
            self.conflicts += 1
            log.debug("lost the race for %s %s", type(decision).__name__, decision.id)
            return 0
        except bus.TooLarge as exc:  # a bug (admission and dtf.limits bound every decision): keep the connection
            log.error("not publishing a decision: %s", exc)
            return 0
        except (NatsError, JetStreamError, TimeoutError) as exc:
            log.warning("publishing %s failed (%s); retrying next round", decision.id, exc)
            if not isinstance(exc, JetStreamError) or isinstance(exc, (NoStreamResponseError, ServiceUnavailableError)):
                self.bus_trouble = True  # no answer at all: the bus, not the decision
            return 0
        if self.bus_trouble:
            self._bus_back(datetime.now(UTC))
        if ack.duplicate:
            return 0  # another replica stored this very decision first
        self.published += 1
        if isinstance(decision, ev.TaskAssigned):
            log.info("task %s attempt %d -> %s", decision.task_id, decision.attempt, decision.worker_id)
        elif isinstance(decision, (ev.WorkerLost, ev.TaskFailed)):
            log.warning("%s: %s", type(decision).__name__, decision.reason)
        return ack.seq
