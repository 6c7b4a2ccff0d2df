"""The worker agent: takes its own assignments off the bus and runs up to `concurrency` at once.

Start-up order matters: the durable pull consumer on `dtf.task.*.*.assigned.<worker_id>` exists
before WorkerRegistered is published, so nothing the coordinator assigns after seeing the worker can
be missed; a restarted worker with the same id gets its unacknowledged assignments again (each is
checked for being still current before it runs, see `attempt`).

Background tasks, all owned by `run` and cancelled before it returns:
    heartbeat   WorkerHeartbeat (running task ids, cpu/memory %) every `heartbeat_interval` seconds
    attempts    one task per accepted assignment (`attempt.execute`)
and a core-NATS subscription to every TaskCancelled, which cancels matching running attempts, and
one to this worker's TaskPreempted, which kills the attempt and hands it back (TaskReleased).

The fetch loop pulls with short timeouts (a timeout is "nothing yet") and acks every message on its
own. An assignment beyond `concurrency` is handed back at once (TaskReleased "worker at capacity").
When `stop` is set: no more fetches; running attempts get `drain_grace` seconds to finish, then are
cancelled and released ("worker stopping"); WorkerLeft is published; `run` returns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from dtf import events as ev
from dtf import subjects
from dtf.state import AT_CAPACITY
from dtf.streams import bus, topology
from dtf.workers import capabilities, idle
from dtf.workers.attempt import Attempt, Context, execute, publish, released

log = logging.getLogger("dtf.worker")

FETCH_TIMEOUT_S = 1.0
ERROR_PAUSE_S = 1.0


class WorkerAgent:
    def __init__(
        self, nc: Client, *, worker_id: str, concurrency: int = 1, tags: dict[str, str] | None = None,
        cache_dir: str | os.PathLike[str], python: str = sys.executable, heartbeat_interval: float = 5.0,
        drain_grace: float = 10.0, workdir: str | os.PathLike[str] | None = None,
        fetch_timeout: float = FETCH_TIMEOUT_S, exit_when_idle: float | None = None,
    ) -> None:
        """`workdir` is where tasks without a workspace run (default: the current directory). With
        `exit_when_idle`, the worker stops itself (drains, leaves) after that many seconds with
        nothing assigned and nothing running."""
        if not subjects.is_token(worker_id):
            raise ValueError(f"worker id {worker_id!r} must be letters, digits, _ or - (at most 80)")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.nc = nc
        self.js = nc.jetstream()
        self.worker_id = worker_id
        self.concurrency = concurrency
        self.tags = dict(tags or {})
        self.heartbeat_interval = heartbeat_interval
        self.drain_grace = drain_grace
        self.fetch_timeout = fetch_timeout
        self.exit_when_idle = exit_when_idle
        self.ctx = Context(
            nc=nc, js=self.js, worker_id=worker_id, cache_dir=Path(cache_dir).resolve(),
            workdir=Path(workdir or Path.cwd()).resolve(), python=python,
        )
        self.attempts: dict[tuple[str, int], Attempt] = {}
        self._sub: JetStreamContext.PullSubscription | None = None
        self.attempt_ended: Callable[[float], None] | None = None
        """Called with the seconds an attempt held the worker when it ends (set by dtf.workers.metrics)."""

    # --- lifecycle ------------------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Work until `stop` is set, then drain and leave (see the module docstring)."""
        heartbeat: asyncio.Task[None] | None = None
        cancellations = preemptions = None
        try:
            await asyncio.to_thread(self.ctx.cache_dir.mkdir, parents=True, exist_ok=True)
            await self._bind_consumer()
            cancellations = await self.nc.subscribe(subjects.cancellations(), cb=self._on_cancel)
            preemptions = await self.nc.subscribe(subjects.preemptions_for(self.worker_id), cb=self._on_preempt)
            caps = await asyncio.to_thread(capabilities.detect, self.tags)
            psutil.cpu_percent(interval=None)  # primes the counter the heartbeats read
            await publish(self.js, ev.WorkerRegistered(
                worker_id=self.worker_id, host=socket.gethostname(), pid=os.getpid(),
                concurrency=self.concurrency, capabilities=caps,
            ))
            log.info("worker %s registered (%d slots, %s)", self.worker_id, self.concurrency,
                     ",".join(caps.hardware))
            heartbeat = asyncio.create_task(self._heartbeat_loop(), name="heartbeat")
            await self._fetch_loop(stop)
            await self._drain()
            await publish(self.js, ev.WorkerLeft(worker_id=self.worker_id, reason="stopped"))
            log.info("worker %s left", self.worker_id)
        finally:
            owned = [a.task for a in self.attempts.values() if a.task is not None]
            if heartbeat is not None:
                owned.append(heartbeat)
            for task in owned:
                task.cancel()
            await asyncio.gather(*owned, return_exceptions=True)
            await self.ctx.warm.close()  # warm pytest processes and their workspace copies
            for sub in (cancellations, preemptions, self._sub):
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def _bind_consumer(self) -> None:
        """Create (or update) this worker's durable consumer and bind a pull subscription to it."""
        config = topology.worker_consumer(self.worker_id)
        await self.js.add_consumer(topology.EVENTS, config)
        self._sub = await self.js.pull_subscribe_bind(durable=config.durable_name, stream=topology.EVENTS)

    async def _rebind(self) -> None:
        """After bus trouble: a pull subscription may stop receiving after a server restart. The old
        subscription is dropped first, so a bind that fails (mid-election) is retried by the fetch
        loop instead of leaving a dead subscription whose fetches only ever time out."""
        old, self._sub = self._sub, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.unsubscribe()
        await self._bind_consumer()

    # --- background loops -----------------------------------------------------------------------------

    def running(self) -> list[Attempt]:
        """Attempts holding a slot (not yet publishing their final event)."""
        return [a for a in self.attempts.values() if not a.reported]

    async def _heartbeat_loop(self) -> None:
        while True:
            beat = ev.WorkerHeartbeat(
                worker_id=self.worker_id,
                running=sorted({a.assignment.task_id for a in self.running()}),
                cpu_percent=psutil.cpu_percent(interval=None),
                memory_percent=psutil.virtual_memory().percent,
            )
            try:
                await bus.publish(self.js, beat)
            except Exception as exc:  # noqa: BLE001 - a missed beat is no reason to stop working
                log.warning("heartbeat failed: %s", exc)
            await asyncio.sleep(self.heartbeat_interval)

    async def _fetch_loop(self, stop: asyncio.Event) -> None:
        failures = 0
        since: float | None = None
        while not stop.is_set():
            since = idle.idle_since(since, bool(self.attempts), time.monotonic())
            if idle.should_exit(since, time.monotonic(), self.exit_when_idle):
                log.info("worker %s idle for %gs: leaving", self.worker_id, self.exit_when_idle)
                stop.set()  # the service's own stop: the same drain and WorkerLeft as a SIGTERM
                break
            # Python 3.11: asyncio.wait_for inside nats-py's fetch can turn our cancel into a TimeoutError.
            if (task := asyncio.current_task()) is not None and task.cancelling():
                raise asyncio.CancelledError
            batch = max(1, self.concurrency - len(self.running()))
            try:
                if self._sub is None:  # a rebind failed: bind again before fetching
                    await self._bind_consumer()
                msgs = await self._sub.fetch(batch, timeout=self.fetch_timeout)
            except TimeoutError:  # nats' TimeoutError included: nothing assigned yet
                failures = 0
                continue
            except Exception as exc:  # noqa: BLE001 - bus trouble: pause, retry, rebind
                failures += 1
                log.warning("fetching assignments failed (%s); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), ERROR_PAUSE_S)
                if failures >= 3:
                    with contextlib.suppress(Exception):
                        await self._rebind()
                continue
            failures = 0
            since = None if msgs else since  # an assignment, even one handed back, is not idleness
            for msg in msgs:
                await self._on_assignment(msg, stopping=stop.is_set())

    # --- assignments and cancellations ----------------------------------------------------------------

    async def _on_assignment(self, msg: Msg, *, stopping: bool) -> None:
        try:
            event = ev.decode(msg.data)
        except ev.DecodeError as exc:
            log.warning("dropping an undecodable message on %s: %s", msg.subject, exc)
            await msg.ack()
            return
        if not isinstance(event, ev.TaskAssigned) or event.worker_id != self.worker_id:
            log.warning("dropping %s on %s: not an assignment to this worker", type(event).__name__, msg.subject)
            await msg.ack()
            return
        key = (event.task_id, event.attempt)
        if key in self.attempts:  # redelivered while we work on it: renew the claim on the new delivery
            self.attempts[key].msg = msg
            return
        if stopping:
            await self._hand_back(msg, event, "worker stopping")
            return
        if len(self.running()) >= self.concurrency:
            await self._hand_back(msg, event, f"{AT_CAPACITY} ({self.concurrency})")
            return
        attempt = Attempt(assignment=event, msg=msg, seq=msg.metadata.sequence.stream)
        self.attempts[key] = attempt
        attempt.task = asyncio.create_task(self._execute(attempt), name=f"attempt {key}")

    async def _hand_back(self, msg: Msg, event: ev.TaskAssigned, reason: str) -> None:
        try:
            await publish(self.js, released(event, reason))
            await msg.ack()
            log.info("released %s/%s attempt %d: %s", event.run_id, event.task_id, event.attempt, reason)
        except Exception as exc:  # noqa: BLE001 - unacked: it comes back and is decided again
            log.warning("could not release %s attempt %d: %s", event.task_id, event.attempt, exc)

    async def _execute(self, attempt: Attempt) -> None:
        began = time.monotonic()
        try:
            await execute(self.ctx, attempt)
        finally:
            self.attempts.pop(attempt.key, None)
            if self.attempt_ended is not None:
                self.attempt_ended(time.monotonic() - began)

    async def _on_cancel(self, msg: Msg) -> None:
        try:
            event = ev.decode(msg.data)
        except ev.DecodeError:
            return
        if not isinstance(event, ev.TaskCancelled):
            return
        for attempt in list(self.attempts.values()):
            a = attempt.assignment
            if a.task_id == event.task_id and a.run_id == event.run_id:
                if not subjects.may_cancel(event.by, a.submitter):
                    log.warning("ignoring a cancel of %s by %s: it is %s's task", a.task_id, event.by, a.submitter)
                    continue
                log.info("cancelling %s/%s attempt %d: %s", a.run_id, a.task_id, a.attempt, event.reason)
                attempt.cancel.set()

    async def _on_preempt(self, msg: Msg) -> None:
        try:
            event = ev.decode(msg.data)
        except ev.DecodeError:
            return
        if not isinstance(event, ev.TaskPreempted) or subjects.mismatch(event, msg.subject) is not None:
            return
        attempt = self.attempts.get((event.task_id, event.attempt))
        if attempt is None or attempt.assignment.run_id != event.run_id or attempt.reported:
            return  # already finished, or never ours: nothing to hand back
        log.info("handing back %s/%s attempt %d: %s", event.run_id, event.task_id, event.attempt, event.reason)
        attempt.releasing = True
        attempt.release_reason = event.reason or f"preempted for {event.by_task}"
        attempt.cancel.set()

    # --- shutdown ---------------------------------------------------------------------------------------

    async def _drain(self) -> None:
        tasks = [a.task for a in self.attempts.values() if a.task is not None]
        if tasks and self.drain_grace > 0:
            log.info("draining: waiting up to %gs for %d attempt(s)", self.drain_grace, len(tasks))
            await asyncio.wait(tasks, timeout=self.drain_grace)
        for attempt in self.running():
            attempt.releasing = True
            attempt.cancel.set()
        remaining = [a.task for a in self.attempts.values() if a.task is not None]
        await asyncio.gather(*remaining, return_exceptions=True)
