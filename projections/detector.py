"""The detector service: follows DTF_EVENTS and publishes what `dtf.projections.detection` finds.

    run_detector(nc, stop)

It keeps no state of its own: at every start it reads DTF_EVENTS from sequence 1 through an ordered
consumer (like the coordinator) and folds it with the coordinator's `Fold`, so only results that
count are seen (the current attempt's, from its worker; not a late one from a lost attempt), and
each worker's hardware and each task's submitter are known. Each counted result goes through the
pure `Detector`, into its owner's series (the task's submitter: one tenant's results never move
another's baseline).

Nothing is published twice. Detections are TaskEvents with deterministic ids
(`<kind>-<series hash>-<result id>`), but JetStream deduplicates ids for 2 minutes only, so the
follower also folds the detections already in the log: while it replays, what it finds is only
*due*; a detection event read from the log settles the due one with its id; once the follow has
caught up with the stream, whatever is still due was never published and is published then. Past
that point each new result's detections are published as they come. A restarted or second detector
therefore publishes nothing a previous one did, and a rebuild finds the same detections.

Upgrading from the detector whose series were shared by every submitter: the ids do not name the
owner, so a detection the owner's own series makes again (same kind, series name and triggering
result) is the one in the log and is not published again. What the shared series found and the
owner's does not stays in the log as it was (with owner ""); what only the owner's finds is due,
published once when the first follow catches up, and never again.

The fold and detection run in a worker thread, one batch at a time, never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import NamedTuple

from nats.aio.client import Client
from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import Error as JetStreamError

from dtf import events as ev
from dtf import subjects
from dtf.projections import artifacts
from dtf.projections.detection import Detector, Settings
from dtf.state import Fold, TaskState
from dtf.streams import bus, topology

log = logging.getLogger("dtf.detector")

BATCH = 500
FOLLOW_CHECK_S = 1.0
"""How long the follow may be quiet before we check the stream has nothing newer for us."""
RETRY_DELAY_S = 1.0
PUBLISH_WINDOW = 256
"""Detections in flight at once (a first start on a long history may find thousands)."""


def benchmark_name(task: TaskState) -> str:
    """What a series calls the task: its spec name, else its command line, else its id."""
    spec = task.spec
    if spec is None:
        return task.task_id
    command = spec.config.get("command")
    return spec.name or (command if isinstance(command, str) and command else task.task_id)


class Counted(NamedTuple):
    """A result the fold counted, with what a series needs to know about it."""

    result: ev.ResultReported
    benchmark: str
    hardware: list[str]
    tests: list[ev.TestOutcome]
    owner: str = ""
    """The task's submitter, whose runs the result's series are (one tenant's series never hold
    another's results)."""


class Results:
    """The coordinator's fold over stored messages, telling which results count: the current
    attempt's, from its worker (not a late one from a lost attempt, nor a duplicate)."""

    def __init__(self) -> None:
        self.fold = Fold()

    def apply(
        self, message: bus.StoredMsg, tests: Mapping[tuple[str, str], list[ev.TestOutcome]],
    ) -> tuple[ev.Event | None, Counted | None]:
        """The event the message carried (None if not accepted) and, for a counted result, its context."""
        task_id = subjects.parse(message.subject).task_id
        before = self.fold.tasks.get(task_id) if task_id else None
        event = self.fold.apply(message.subject, message.seq, message.data).event
        # The coordinator's concurrency tokens and pending rejections: not needed here.
        self.fold.task_seq.clear()
        self.fold.invalid.clear()
        after = self.fold.tasks.get(task_id) if task_id else None
        if not isinstance(event, ev.ResultReported) or after is None or after is before:
            return event, None
        worker = self.fold.workers.get(event.worker_id)
        hardware = list(worker.capabilities.hardware) if worker and worker.registered_at else []
        outcomes = event.tests or (tests.get((event.worker_id, event.tests_ref), []) if event.tests_ref else [])
        return event, Counted(event, benchmark_name(after), hardware, outcomes, after.submitter)


class Follower:
    """The pure half of the service: stored messages in, detections due for publishing out."""

    def __init__(self, settings: Settings | None = None) -> None:
        self.results = Results()
        self.detector = Detector(settings)
        self.seen: set[str] = set()
        """Ids of the detection events in the log so far."""
        self.due: dict[str, ev.Detection] = {}
        """Detections found but not (yet) seen in the log, in the order found."""

    @property
    def last_seq(self) -> int:
        return self.results.fold.last_seq

    def apply(self, messages: Sequence[bus.StoredMsg], tests: Mapping[tuple[str, str], list[ev.TestOutcome]]) -> None:
        for message in messages:
            event, counted = self.results.apply(message, tests)
            if isinstance(event, ev.Detection):
                self.published(event)
            elif counted is not None:
                for detection in self.detector.observe(*counted):
                    if detection.id not in self.seen:
                        self.due.setdefault(detection.id, detection)

    def published(self, detection: ev.Detection) -> None:
        self.seen.add(detection.id)
        self.due.pop(detection.id, None)


async def run_detector(
    nc: Client, stop: asyncio.Event, *, settings: Settings | None = None, batch: int = BATCH,
    follower: Follower | None = None,
) -> None:
    """Follow DTF_EVENTS and publish detections until `stop` is set. The stream must exist. A
    `follower` passed in (a fresh one) can be watched: `last_seq` and `due` say how far it got."""
    js = nc.jetstream()
    follower = follower or Follower(settings)
    follow = asyncio.create_task(_follow(js, follower, batch), name="detector-follow")
    try:
        await stop.wait()
    finally:
        follow.cancel()
        await asyncio.gather(follow, return_exceptions=True)


async def _follow(js: JetStreamContext, follower: Follower, batch: int) -> None:
    """Read, detect, publish; a failed or stalled follow starts again after the last folded message."""
    while True:
        try:
            async for chunk in _chunks(js, follower, batch):
                if chunk:
                    tests = await artifacts.fetch_tests(js, chunk)
                    await _in_thread(follower.apply, chunk, tests)
                if (not chunk or chunk[-1].pending == 0) and follower.due:
                    await _publish_due(js, follower)
        except (NatsError, JetStreamError, TimeoutError) as exc:
            log.warning("following %s failed (%s); following it anew", topology.EVENTS, exc)
            await asyncio.sleep(RETRY_DELAY_S)


async def _in_thread(func, *args) -> None:
    """Run `func` in a thread; a cancel waits for it, so the follower is never left half-applied."""
    future = asyncio.ensure_future(asyncio.to_thread(func, *args))
    try:
        await asyncio.shield(future)
    except asyncio.CancelledError:
        await asyncio.gather(future, return_exceptions=True)
        raise


async def _chunks(js: JetStreamContext, follower: Follower, batch: int) -> AsyncIterator[list[bus.StoredMsg]]:
    """Batches of the stream after the last folded message, each ending when it is full or when it
    reaches the end of what is stored, and an empty batch each quiet second once caught up (so a
    failed publish is retried)."""
    async def stalled() -> bool:
        return await bus.tail(js, topology.EVENTS) > follower.last_seq

    chunk: list[bus.StoredMsg] = []
    async for message in bus.follow(js, topology.EVENTS, [subjects.TASKS, subjects.WORKERS],
                                    lambda: {"start_seq": follower.last_seq + 1}, stalled,
                                    check_s=FOLLOW_CHECK_S, idle=True):
        if message is None:
            yield chunk
            chunk = []
            continue
        if chunk and message.seq <= chunk[-1].seq:
            continue  # the follow started anew from the last folded message: these are in hand
        chunk.append(message)
        if message.pending == 0 or len(chunk) >= batch:
            yield chunk
            chunk = []


async def _publish_due(js: JetStreamContext, follower: Follower) -> None:
    """Publish every due detection, PUBLISH_WINDOW at a time; each one stored is no longer due."""
    due = list(follower.due.values())
    for start in range(0, len(due), PUBLISH_WINDOW):
        window = due[start:start + PUBLISH_WINDOW]
        acks = await asyncio.gather(*(bus.publish(js, d) for d in window), return_exceptions=True)
        for detection, ack in zip(window, acks, strict=True):
            if isinstance(ack, BaseException):
                log.warning("publishing %s failed (%s); it stays due", detection.id, ack)
                continue
            follower.published(detection)
            log.info("%s %s: %+.3g (run %s, task %s)", type(detection).__name__, detection.series,
                     detection.size, detection.run_id, detection.task_id)
