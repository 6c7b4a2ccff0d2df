"""One assignment on this worker, from its delivery to its ack.

    still current?  nothing stored after the assignment may supersede it (a result, failure or
                    release of this attempt, a cancel, a newer attempt): a restarted worker gets its
                    unacked assignments again and must not rerun finished work; stale ones are
                    acked and skipped (`still_current`)
    TaskStarted     published only if nothing landed on the task since that check (the expected
                    last subject sequence, as the coordinator's decisions): if the coordinator took
                    the attempt back for not starting in time, the start is refused and the
                    assignment skipped, so the same task never runs twice at once (`claim`)
    workspace       then the workspace (TaskFailed "data"/"network" when it cannot be had)
                    materialized once per hash in the cache, copied for each attempt
    run             output streamed to the live-log subject; `msg.in_progress()` every 10 s keeps the
                    claim (the consumer's ack_wait is 30 s)
    report          log to the artifacts store (unless output_tail already holds all of it), then
                    ResultReported, and only then the ack; while
                    the worker drains, TaskReleased("worker stopping") instead, and when the
                    coordinator preempts the attempt, TaskReleased with the preemption's reason

An event the worker cannot publish leaves the assignment unacknowledged, so JetStream redelivers it;
event ids are deterministic per (task, attempt), so a retried publish is stored once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import nats.errors
import tenacity
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.errors import NoStreamResponseError, NotFoundError, ServiceUnavailableError

from dtf import events as ev
from dtf import subjects
from dtf.streams import bus, topology
from dtf.workers import artifacts, sandbox, workspace
from dtf.workers.livelog import LiveLog
from dtf.workers.process import TAIL_BYTES, run_process
from dtf.workers.pyenv import EnvCache
from dtf.workers.runner import run_attempt
from dtf.workers.warm import WarmPool

log = logging.getLogger("dtf.worker.attempt")

IN_PROGRESS_INTERVAL_S = topology.ASSIGNMENT_ACK_WAIT_S / 3
PUBLISH_TIMEOUT_S = 2.0
PUBLISH_RETRY_FOR_S = 60.0
"""How long a worker keeps retrying an event through bus trouble (a stream leader election takes
4-9 s): at most 0.5 s apart, so the event lands soon after the stream answers again."""
RECHECK_DELAY_S = 2.0
"""How soon an assignment whose currency could not be checked (bus trouble) comes back."""
RETRYABLE = (
    TimeoutError, ConnectionError, nats.errors.ConnectionClosedError, nats.errors.NoServersError,
    nats.errors.NoRespondersError, nats.errors.OutboundBufferLimitError, ServiceUnavailableError,
    NoStreamResponseError,
)
"""Bus trouble that passes; anything else (a refused or oversized event) is not retried."""


@dataclass
class Context:
    """What every attempt on this worker shares."""

    nc: Client
    js: JetStreamContext
    worker_id: str
    cache_dir: Path
    workdir: Path
    python: str
    workspace_locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)
    warm: WarmPool = field(init=False)
    """Warm pytest processes for split shards (`warm`)."""
    envs: EnvCache = field(init=False)
    """Test tasks' own Python environments (`pyenv`)."""

    def __post_init__(self) -> None:
        self.warm = WarmPool(self.cache_dir / "warm" / self.worker_id, self.python)
        self.envs = EnvCache(self.cache_dir / "envs")


@dataclass(eq=False)
class Attempt:
    assignment: ev.TaskAssigned
    msg: Msg
    """The latest delivery of the assignment; a redelivery while running replaces it."""
    seq: int
    cancel: asyncio.Event = field(default_factory=asyncio.Event)
    releasing: bool = False
    """Set when the worker stops or the attempt is preempted: hand it back instead of reporting a result."""
    release_reason: str = "worker stopping"
    reported: bool = False
    """Its final event is being published: it no longer takes a slot."""
    task: asyncio.Task[None] | None = None

    @property
    def key(self) -> tuple[str, int]:
        return self.assignment.task_id, self.assignment.attempt


CLAIM_TRIES = 5
"""How often a start refused by a harmless newcomer on the task (a deadline note) is checked again."""


async def publish(js: JetStreamContext, event: ev.Event, expected_seq: int | None = None) -> None:
    """Publish, retrying through short bus trouble (safe: the event id deduplicates). With
    `expected_seq`, `bus.Conflict` when the task moved past that sequence (never retried)."""
    retrying = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(RETRYABLE),
        wait=tenacity.wait_exponential_jitter(multiplier=0.1, max=0.5, jitter=0.1),
        stop=tenacity.stop_after_delay(PUBLISH_RETRY_FOR_S),
        before_sleep=lambda state: log.warning(
            "publishing %s %s failed (%s); retrying", type(event).__name__, event.id, state.outcome.exception()),
        reraise=True,
    )
    async for attempt in retrying:
        with attempt:
            await bus.publish(js, event, expected_seq=expected_seq, timeout=PUBLISH_TIMEOUT_S)


def supersedes(event: ev.Event, a: ev.TaskAssigned) -> bool:
    """Whether an event on the task, stored after assignment `a`, means `a` must not run (now)."""
    if isinstance(event, ev.TaskCancelled):
        return subjects.may_cancel(event.by, a.submitter)
    if isinstance(event, ev.AttemptEvent):
        ended = isinstance(event, (ev.ResultReported, ev.TaskFailed, ev.TaskReleased))
        return event.attempt > a.attempt or (event.attempt == a.attempt and ended)
    return False


def _admitted(subject: str, data: bytes | None) -> ev.Event | None:
    """The event in a stored message, if the coordinator's fold would accept it there."""
    try:
        event = ev.decode(data or b"")
    except ev.DecodeError:
        return None
    return event if subjects.mismatch(event, subject) is None else None


def _moved_on(event: ev.Event, seq: int) -> str:
    detail = f" attempt {event.attempt}" if isinstance(event, ev.AttemptEvent) else ""
    return f"the task moved on: {type(event).__name__}{detail} at seq {seq}"


class Currency(NamedTuple):
    stale: str | None
    """Why the assignment must not run; None when it should."""
    seq: int
    """The task's last stream sequence when it was checked."""


async def still_current(ctx: Context, attempt: Attempt) -> Currency:
    """Whether the assignment should run, as of the task's last sequence.

    Fast path: the task's last message (last-by-subject on the wildcard `dtf.task.<run>.<task>.>`) is
    this assignment, or this worker's own TaskStarted for it (a restarted worker finishing what it
    began): run; a result, failure or release of this attempt, a cancel or a newer attempt: skip.
    Anything else there (a rejected forgery, junk, a deadline note) says nothing, so the history since
    the assignment is read for a superseding event."""
    a = attempt.assignment
    task_subjects = subjects.task_all(a.run_id, a.task_id)
    try:
        last = await ctx.js.get_last_msg(topology.EVENTS, task_subjects)
    except NotFoundError:
        return Currency("the task has no history on the bus", 0)
    if last.seq == attempt.seq:
        return Currency(None, last.seq)
    event = _admitted(last.subject, last.data)
    if event is not None:
        if isinstance(event, ev.TaskStarted) and event.attempt == a.attempt and event.worker_id == ctx.worker_id:
            return Currency(None, last.seq)
        if supersedes(event, a):
            return Currency(_moved_on(event, last.seq), last.seq)
    reader = bus.read(ctx.js, topology.EVENTS, [task_subjects], start_seq=attempt.seq + 1)
    async with contextlib.aclosing(reader) as stored_messages:  # its consumer goes now, not at GC
        async for stored in stored_messages:
            event = _admitted(stored.subject, stored.data)
            if event is not None and supersedes(event, a):
                return Currency(_moved_on(event, stored.seq), stored.seq)
    return Currency(None, last.seq)


class Unclaimed(Exception):
    """The start kept meeting newer messages on the task: try again later."""


async def claim(ctx: Context, attempt: Attempt, currency: Currency) -> str | None:
    """Publish the attempt's TaskStarted unless something landed on the task since `currency` was
    checked; then check again: None once started, else why it is stale. The coordinator takes back
    an attempt not started in time with the same kind of conditional write, so of the start and the
    take-back exactly one is stored, and a start that lost to a take-back finds the attempt stale."""
    a = attempt.assignment
    started = ev.TaskStarted(
        id=f"started-{a.task_id}-{a.attempt}", run_id=a.run_id, task_id=a.task_id,
        attempt=a.attempt, worker_id=a.worker_id, pid=os.getpid(),
    )
    for _ in range(CLAIM_TRIES):
        try:
            await publish(ctx.js, started, expected_seq=currency.seq)
            return None
        except bus.Conflict:  # something landed since the check: look again
            currency = await still_current(ctx, attempt)
            if currency.stale is not None:
                return currency.stale
    raise Unclaimed(f"the task kept moving while {attempt.key} was being started")


def released(a: ev.TaskAssigned, reason: str) -> ev.TaskReleased:
    return ev.TaskReleased(
        id=f"released-{a.task_id}-{a.attempt}", run_id=a.run_id, task_id=a.task_id, attempt=a.attempt,
        worker_id=a.worker_id, reason=reason,
    )


def failed(a: ev.TaskAssigned, category: str, reason: str) -> ev.TaskFailed:
    return ev.TaskFailed(
        id=artifacts.failed_id(a.task_id, a.attempt), run_id=a.run_id, task_id=a.task_id,
        attempt=a.attempt, worker_id=a.worker_id, category=category, reason=reason,  # type: ignore[arg-type]
    )


async def _finish(ctx: Context, attempt: Attempt, event: ev.Event) -> None:
    """Publish the attempt's last event, then ack its assignment."""
    attempt.reported = True
    await publish(ctx.js, event)
    await attempt.msg.ack()


async def _keep_claim(attempt: Attempt) -> None:
    while True:
        await asyncio.sleep(IN_PROGRESS_INTERVAL_S)
        try:
            await attempt.msg.in_progress()
        except Exception as exc:  # noqa: BLE001 - the bus may be briefly away; the next may get through
            log.warning("in-progress ack for %s failed: %s", attempt.key, exc)


async def _workdir(ctx: Context, a: ev.TaskAssigned, attempt_dir: Path) -> Path:
    """Where the attempt runs: the worker's workdir, or a private copy of the cached workspace (so a
    task that writes into its tree, even just __pycache__, cannot change what a retry starts from);
    a split shard for a warm pytest process gets its run's copy (under task uids only a link to the
    cache: each warm process, and a shard falling back to cold, runs in a copy its uid owns:
    `warm.Lease`)."""
    ref = a.spec.workspace
    if ref is None:  # isolated: the fresh attempt dir, not the worker's own cwd
        return attempt_dir if sandbox.sandbox.fresh_dir else ctx.workdir
    lock = ctx.workspace_locks.setdefault((a.submitter, ref.sha256), asyncio.Lock())
    async with lock:  # from the run owner's bucket: the submitter the event log names, not the ref
        # One cache per worker: which unpacked trees are intact is known only to the process that
        # unpacked them, so a second worker sharing the cache dir would take another's tree for a
        # changed one and remove it while the first copies from it.
        cached = await workspace.materialize(ctx.js, a.submitter, ref, ctx.cache_dir / "workspaces" / ctx.worker_id)
    private = attempt_dir / ref.name
    try:
        if ctx.warm.wants(a.spec):
            return await ctx.warm.workspace(a.run_id, cached, ref.name)
        await asyncio.to_thread(shutil.copytree, cached, private, symlinks=True)
    except OSError as exc:  # shutil.Error included: a full disk, a vanished cache
        raise workspace.WorkspaceError(f"cannot copy the workspace for this attempt: {exc}", "resource") from None
    return private


async def execute(ctx: Context, attempt: Attempt) -> None:
    """Carry one assignment through to its ack (see the module docstring). Never raises except on
    cancellation; trouble it cannot report leaves the assignment for redelivery."""
    a = attempt.assignment
    keepalive = asyncio.create_task(_keep_claim(attempt), name=f"in-progress {a.task_id}")
    attempt_dir = sandbox.sandbox.attempt_dir(ctx.cache_dir / "attempts",
                                              f"{ctx.worker_id}-{a.task_id}-{a.attempt}")
    uid: int | None = None
    try:
        try:
            currency = await still_current(ctx, attempt)
            stale = currency.stale
            if stale is None and not attempt.releasing:
                stale = await claim(ctx, attempt, currency)
        except Exception as exc:  # noqa: BLE001 - cannot tell: let it come back
            log.warning("cannot check or start %s (%s); it will come back", attempt.key, exc)
            with contextlib.suppress(Exception):
                await attempt.msg.nak(delay=RECHECK_DELAY_S)
            return
        if stale is not None:
            log.info("skipping %s/%s attempt %d: %s", a.run_id, a.task_id, a.attempt, stale)
            await attempt.msg.ack()
            return
        if attempt.releasing:
            await _finish(ctx, attempt, released(a, attempt.release_reason))
            return
        await asyncio.to_thread(shutil.rmtree, attempt_dir, True)  # a crashed earlier run's leftovers
        try:
            workdir = await _workdir(ctx, a, attempt_dir)
        except workspace.WorkspaceError as exc:
            await _finish(ctx, attempt, failed(a, exc.category, str(exc)))
            return
        if not ctx.warm.wants(a.spec):  # a warm shard runs as its warm process's uid, which `warm` takes
            uid = await asyncio.to_thread(sandbox.sandbox.take_uid)
            await asyncio.to_thread(attempt_dir.mkdir, parents=True, exist_ok=True)
            await asyncio.to_thread(sandbox.hand_over, attempt_dir, uid)
        live = LiveLog(ctx.nc, subjects.live_log(a.submitter or "_", a.task_id, a.worker_id)).start()
        try:
            launch = ctx.warm.launcher(a.run_id, a.spec) if ctx.warm.wants(a.spec) else run_process
            result = await run_attempt(a.spec, workdir, attempt_dir, python=ctx.python,
                                       on_output=live.append, cancel=attempt.cancel, launch=launch,
                                       envs=ctx.envs, uid=uid)
        finally:
            await live.aclose()
        if attempt.releasing:
            await _finish(ctx, attempt, released(a, attempt.release_reason))
            return
        log_ref = None
        try:
            if await asyncio.to_thread(lambda: result.log_path.stat().st_size) > TAIL_BYTES:
                log_ref = await artifacts.upload_log(ctx.nc, ctx.js, a, result.log_path)
        except Exception as exc:  # noqa: BLE001 - the result matters more than its log
            log.warning("uploading the log of %s failed: %s", attempt.key, exc)
        await _finish(ctx, attempt, await artifacts.result_event(ctx.nc, ctx.js, a, result, log_ref))
        log.info("%s/%s attempt %d: %s", a.run_id, a.task_id, a.attempt, result.outcome)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        log.exception("attempt %s broke", attempt.key)
        # Even if its result was published (an ack lost in a failover), this failure settles nothing
        # then: the fold takes one terminal event per attempt.
        try:
            await _finish(ctx, attempt, failed(a, "worker", f"the worker failed: {exc!r}"[:1000]))
        except Exception:
            log.exception("cannot report the failure of %s; it will come back", attempt.key)
            with contextlib.suppress(Exception):  # unacked: have it back soon, not after the ack wait
                await attempt.msg.nak(delay=RECHECK_DELAY_S)
    finally:
        keepalive.cancel()
        await asyncio.gather(keepalive, return_exceptions=True)
        await asyncio.to_thread(sandbox.sandbox.release_uid, uid)  # its setsid children too
        await asyncio.to_thread(shutil.rmtree, attempt_dir, True)
