"""Chaos: the whole system on a 3-node loopback cluster while workers, coordinators, NATS nodes and
the projector are killed, paused and restarted; then proof from the event log that nothing was lost
or completed twice, and that the rebuilt read model equals the live one.

    python bench/chaos.py [--tasks 500] [--quick] [--keep] [--only leader,follower --repeat 3 --no-together]

Everything is a real process: 3 nats-server nodes (streams.cluster.Cluster, R3 streams), 2
`dtf coordinator` replicas, 3 `dtf worker`s (heartbeat 0.5 s, coordinator timeout 2 s), 1
`dtf projector`, all given the comma-separated URL list. A feeder keeps a small backlog of short
command tasks queued (so the workers are always busy and throughput is capacity, not feed rate)
until the fault schedule is over and at least --tasks were submitted. Faults, in turn and then
together: a worker SIGKILLed mid-task (a new worker starts so capacity stays), a worker SIGSTOPped
past the heartbeat timeout then SIGCONTed (its late result is stored and must settle nothing), a
coordinator replica SIGKILLed (and restarted), a NATS follower node SIGKILLed then restarted, the
DTF_EVENTS stream leader node SIGKILLed then restarted, the projector SIGKILLed then restarted.
The worker faults target a "marker" task (`sleep`, priority 1) seen running on the worker, so the
fault is certainly mid-task. A plain nats-py publisher publishes with retries to a scratch R3
stream (led by the same node as DTF_EVENTS) all along: its gaps are what the dispatch gaps are
compared with; and an events probe times DTF_EVENTS' own answers (a publish the stream always
refuses, so nothing is stored): the floor, since each Raft group's election has its own random timer. Times come from the server's store timestamps and the harness's wall clock (one
machine, one clock). Prints the figures and a final JSON line. `tests/test_chaos.py` runs the short
version of this harness in CI.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import nats
from dtf.projections.rebuild import rebuild, tables_equal
from dtf.streams import bus, topology
from dtf.streams.cluster import Cluster
from nats.errors import NoRespondersError
from nats.js.api import ConsumerConfig, StorageType, StreamConfig

from dtf import events as ev
from dtf import subjects
from dtf.cli.submit import submissions
from dtf.spec import TaskSpec, validate
from dtf.state import Fold

ROOT = Path(__file__).resolve().parents[1]
PROBE_STREAM = "CHAOS_PROBE"
PROBE_SUBJECT = "chaos.probe"
FAULTS = ("worker-kill", "worker-stop", "coordinator", "follower", "leader", "projector")


class ChaosError(AssertionError):
    """A condition the harness waited for did not come within its (generous) bound."""


def now() -> float:
    return time.time()


@dataclass
class Stored:
    seq: int
    subject: str
    data: bytes
    stored_at: float
    """The server's store timestamp (epoch seconds)."""


@dataclass
class Fault:
    kind: str
    at: float
    target: str = ""
    detail: dict = field(default_factory=dict)


class LiveView:
    """The harness's own fold of DTF_EVENTS, followed live (to find markers running, workers lost,
    tasks settled) the way the coordinator follows it (`bus.follow`), so the feeder never waits on a
    stalled view."""

    def __init__(self, js) -> None:
        self.js = js
        self.fold = Fold()

    async def run(self) -> None:
        async def stalled() -> bool:
            return await bus.tail(self.js, topology.EVENTS) > self.fold.last_seq

        async for msg in bus.follow(self.js, topology.EVENTS, [subjects.TASKS, subjects.WORKERS],
                                    lambda: {"start_seq": self.fold.last_seq + 1}, stalled):
            self.fold.apply(msg.subject, msg.seq, msg.data)


class EventsProbe:
    """When DTF_EVENTS itself answers: a publish that the stream leader always refuses (its expected
    last subject sequence can never match) and so never stores, sent in a loop. Each refusal is the
    stream answering; the gaps between them are DTF_EVENTS' own election gaps, the floor for dtf's
    dispatch gaps (the scratch stream's election is another Raft group with its own random timer)."""

    def __init__(self, js) -> None:
        self.js = js
        self.answers: list[float] = []

    async def run(self, stop: asyncio.Event, interval: float = 0.02) -> None:
        subject = subjects.task("chaos-probe", "never", "submitted", "probe")
        headers = {"Nats-Expected-Last-Subject-Sequence": str(2**62)}
        while not stop.is_set():
            try:
                await self.js.publish(subject, b"{}", timeout=1.0, headers=headers)
                raise ChaosError("DTF_EVENTS stored the events probe's message")
            except nats.js.errors.APIError as exc:
                if exc.err_code != bus.WRONG_LAST_SEQUENCE:
                    await asyncio.sleep(0.05)
                    continue
                self.answers.append(now())
                await asyncio.sleep(interval)
            except ChaosError:
                raise
            except Exception:  # noqa: BLE001 - no answer: the stream is electing or we reconnect
                await asyncio.sleep(0.05)


class Probe:
    """A plain nats-py publisher (default client settings but reconnecting forever) publishing to a
    scratch R3 stream in a loop, retrying every failure; records each ack's wall-clock time."""

    def __init__(self, urls: list[str]) -> None:
        self.urls = urls
        self.acks: list[float] = []
        self.failures = 0
        self.nc = None

    async def setup(self) -> None:
        self.nc = await nats.connect(self.urls, max_reconnect_attempts=-1, error_cb=_ignore)
        js = self.nc.jetstream()
        await js.add_stream(StreamConfig(name=PROBE_STREAM, subjects=[PROBE_SUBJECT], storage=StorageType.FILE,
                                         num_replicas=3, max_msgs=10_000))

    async def run(self, stop: asyncio.Event, interval: float = 0.02) -> None:
        js = self.nc.jetstream()
        n = 0
        while not stop.is_set():
            n += 1
            try:
                await js.publish(PROBE_SUBJECT, b"x", timeout=1.0, headers={"Nats-Msg-Id": f"probe-{n}"})
                self.acks.append(now())
                await asyncio.sleep(interval)
            except Exception:  # noqa: BLE001 - a plain publisher retries whatever went wrong
                self.failures += 1
                await asyncio.sleep(0.05)

    def gap_around(self, t: float) -> float | None:
        return longest_gap(self.acks, t)

    async def close(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()


def longest_gap(times: list[float], at: float, before: float = 1.0, after: float = 30.0) -> float | None:
    """The longest wait between consecutive times around a fault at `at` (from `before` seconds
    ahead of it to `after` seconds past it): how long the flow stopped. (Acks already in flight
    when the fault strikes do not count as the flow resuming.)"""
    window = sorted(x for x in times if at - before <= x <= at + after)
    if not any(x > at for x in window):
        window.append(at + after)  # nothing resumed inside the window: at least this long
    if len(window) < 2:
        return None
    return max(b - a for a, b in itertools.pairwise(window))


async def _ignore(exc: Exception) -> None:
    pass


class Harness:
    def __init__(self, root: Path, *, workers: int = 3, coordinators: int = 2, concurrency: int = 1,
                 heartbeat_interval: float = 0.5, heartbeat_timeout: float = 2.0, task_sleep: float = 0.05,
                 marker_sleep: float = 3.0, say: Callable[[str], None] = print) -> None:
        self.root = root
        self.n_workers = workers
        self.n_coordinators = coordinators
        self.concurrency = concurrency
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_timeout = heartbeat_timeout
        self.task_sleep = task_sleep
        self.marker_sleep = marker_sleep
        self.say = say
        self.cluster = Cluster(root / "nats", 3, name="chaos")
        self.procs: dict[str, subprocess.Popen] = {}
        self.workers: list[str] = []
        self.next_worker = 1
        self.faults: list[Fault] = []
        self.submitted: list[str] = []
        self.markers: list[str] = []
        self.runs = 0
        self.prefix = f"chaos{secrets.token_hex(2)}"
        self.db = root / "readmodel.duckdb"
        self.nc = None
        self.js = None
        self.view: LiveView | None = None
        self.probe: Probe | None = None
        self.events_probe: EventsProbe | None = None
        self._background: list[asyncio.Task] = []
        self._probe_stop = asyncio.Event()
        self.feeding = True
        self.backlog = 0
        self.t0 = 0.0

    # -- processes -----------------------------------------------------------------------------------

    def _spawn(self, name: str, *args: str) -> subprocess.Popen:
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        out = (logs / f"{name}.log").open("ab")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "XDG_STATE_HOME": str(self.root / "state")}
        env.pop("DTF_NATS_URL", None)
        process = subprocess.Popen([sys.executable, "-m", "dtf", *args, "--nats", self.cluster.url],
                                   stdout=out, stderr=out, stdin=subprocess.DEVNULL, env=env, cwd=self.root)
        out.close()
        self.procs[name] = process
        return process

    def spawn_coordinator(self, i: int) -> None:
        self._spawn(f"c{i}", "coordinator", "--id", f"c{i}", "--replicas", "3",
                    "--heartbeat-timeout", str(self.heartbeat_timeout))

    def spawn_worker(self) -> str:
        wid = f"w{self.next_worker}"
        self.next_worker += 1
        self._spawn(wid, "worker", "--id", wid, "--heartbeat-interval", str(self.heartbeat_interval),
                    "--cache-dir", str(self.root / "cache" / wid), "--concurrency", str(self.concurrency))
        self.workers.append(wid)
        return wid

    def spawn_projector(self) -> None:
        self._spawn("projector", "projector", "--db", str(self.db))

    def signal(self, name: str, sig: int) -> None:
        process = self.procs[name]
        if process.poll() is None:
            process.send_signal(sig)
        if sig == signal.SIGKILL:
            process.wait(10)

    def stop_process(self, name: str, timeout: float = 30) -> None:
        process = self.procs.get(name)
        if process is None or process.poll() is not None:
            return
        process.send_signal(signal.SIGCONT)
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)

    # -- lifecycle -----------------------------------------------------------------------------------

    async def start(self) -> None:
        self.say(f"chaos: data in {self.root}")
        await asyncio.to_thread(self.cluster.start)
        self.nc = await bus.connect(self.cluster.url, name="chaos-harness")
        self.js = self.nc.jetstream()
        await topology.provision(self.js, replicas=3)
        self.probe = Probe(self.cluster.urls)
        await self.probe.setup()
        self.events_probe = EventsProbe(self.js)
        self.view = LiveView(self.js)
        self._background = [asyncio.create_task(self.view.run(), name="live-view"),
                            asyncio.create_task(self.probe.run(self._probe_stop), name="probe"),
                            asyncio.create_task(self.events_probe.run(self._probe_stop), name="events-probe")]
        for i in range(1, self.n_coordinators + 1):
            self.spawn_coordinator(i)
        for _ in range(self.n_workers):
            self.spawn_worker()
        self.spawn_projector()
        await self.until(lambda: all(self.online(w) for w in self.workers), 60, "workers to register")
        self.t0 = now()

    async def close(self) -> None:
        self._probe_stop.set()
        for task in self._background:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for name in list(self.procs):
            await asyncio.to_thread(self.stop_process, name, 20)
        if self.probe is not None:
            await self.probe.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        await asyncio.to_thread(self.cluster.stop)

    # -- waiting -------------------------------------------------------------------------------------

    async def until(self, condition: Callable[[], bool | Awaitable[bool]], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            result = condition()
            if asyncio.iscoroutine(result):
                result = await result
            if result:
                return
            if time.monotonic() > deadline:
                self._check_processes()
                raise ChaosError(f"gave up after {timeout:.0f}s waiting for {what} ({self.status()}); "
                                 f"logs in {self.root / 'logs'}")
            await asyncio.sleep(0.1)

    def _check_processes(self) -> None:
        dead = {n: p.returncode for n, p in self.procs.items() if p.poll() is not None}
        if dead:
            self.say(f"chaos: exited processes: {dead}")

    def status(self) -> str:
        tasks = [self.view.fold.tasks.get(t) for t in self.submitted]
        states: dict[str, int] = {}
        for t in tasks:
            key = t.status if t is not None else "unseen"
            states[key] = states.get(key, 0) + 1
        return f"tasks {states}, folded to seq {self.view.fold.last_seq}"

    def online(self, wid: str) -> bool:
        w = self.view.fold.workers.get(wid)
        return w is not None and w.status == "online"

    def settled(self) -> int:
        return sum(1 for t in self.submitted if (s := self.view.fold.tasks.get(t)) is not None and s.terminal)

    # -- submitting ----------------------------------------------------------------------------------

    async def submit(self, count: int, command: str | None = None, priority: int = 5) -> list[str]:
        self.runs += 1
        run_id = f"{self.prefix}-r{self.runs}"
        spec = validate(TaskSpec(type="command", priority=priority,
                                 config={"command": command or f"sleep {self.task_sleep}"}))
        events = submissions(run_id, [spec] * count, "chaos", "chaos")
        for attempt in range(60):
            try:
                await bus.publish_many(self.js, events)
                break
            except Exception as exc:
                if attempt == 59:
                    raise
                self.say(f"chaos: submit retry ({type(exc).__name__}: {exc})")
                await asyncio.sleep(0.5)
        ids = [e.task_id for e in events]
        self.submitted.extend(ids)
        return ids

    async def feed(self, target: int, backlog: int, chunk: int = 10, cap: int | None = None) -> None:
        """Keep about `backlog` tasks unsettled while `self.feeding`, and submit at least `target`
        (at most `cap`)."""
        while (self.feeding or len(self.submitted) < target) and (cap is None or len(self.submitted) < cap):
            if len(self.submitted) - self.settled() < backlog:
                await self.submit(min(chunk, cap - len(self.submitted)) if cap is not None else chunk)
            else:
                await asyncio.sleep(0.05)

    async def marker(self, what: str) -> tuple[str, str, int]:
        """A `sleep` task seen running: returns (task id, worker id, attempt). (Its first attempt may
        have gone to a worker killed just before, not yet declared lost: any attempt will do.)"""
        [task_id] = await self.submit(1, command=f"sleep {self.marker_sleep}", priority=1)
        self.markers.append(task_id)

        def running() -> bool:
            t = self.view.fold.tasks.get(task_id)
            return t is not None and t.status == "running" and t.worker_id in self.workers

        await self.until(running, 60, f"the marker task for {what} to run")
        t = self.view.fold.tasks[task_id]
        return task_id, t.worker_id, t.attempt

    # -- faults --------------------------------------------------------------------------------------

    def fault(self, kind: str, target: str = "", **detail) -> Fault:
        f = Fault(kind, now(), target, detail)
        self.faults.append(f)
        self.say(f"chaos: +{f.at - self.t0:6.1f}s {kind} {target}")
        return f

    async def kill_worker(self) -> None:
        task_id, wid, attempt = await self.marker("the worker SIGKILL")
        self.fault("worker_sigkill", wid, task=task_id, attempt=attempt)
        self.signal(wid, signal.SIGKILL)
        self.workers.remove(wid)
        self.spawn_worker()

    async def pause_worker(self) -> None:
        task_id, wid, attempt = await self.marker("the worker SIGSTOP")
        started = now()
        f = self.fault("worker_sigstop", wid, task=task_id, attempt=attempt)
        self.signal(wid, signal.SIGSTOP)
        await self.until(lambda: (w := self.view.fold.workers.get(wid)) is not None and w.status == "lost",
                         60, f"{wid} to be declared lost")
        await self.until(lambda: self.view.fold.tasks[task_id].attempt > attempt, 60, f"{task_id} to be reassigned")
        # Its child `sleep` ends while the worker is stopped: on SIGCONT it reports a late result.
        await asyncio.sleep(max(0.0, started + self.marker_sleep + 0.5 - now()))
        f.detail["stopped_s"] = round(now() - f.at, 2)
        self.signal(wid, signal.SIGCONT)
        self.say(f"chaos: +{now() - self.t0:6.1f}s SIGCONT {wid} after {f.detail['stopped_s']}s")

    async def kill_coordinator(self, i: int = 1) -> None:
        self.fault("coordinator_sigkill", f"c{i}")
        self.signal(f"c{i}", signal.SIGKILL)
        self.spawn_coordinator(i)

    async def kill_projector(self) -> None:
        self.fault("projector_sigkill", "projector")
        self.signal("projector", signal.SIGKILL)
        await asyncio.sleep(0.5)
        self.spawn_projector()

    async def events_leader(self) -> int:
        async def known() -> bool:
            with contextlib.suppress(Exception):
                info = await self.js.stream_info(topology.EVENTS)
                return bool(info.cluster and info.cluster.leader)
            return False

        await self.until(known, 60, "DTF_EVENTS to have a leader")
        return self.cluster.index_of((await self.js.stream_info(topology.EVENTS)).cluster.leader)

    async def align_probe(self, node: int) -> None:
        """Move the probe stream's leader to `node` (stepdowns, bounded), so a fault on that node hits
        the plain publisher as it hits dtf."""
        name = self.cluster.server_name(node)
        for _ in range(12):
            info = await self.js.stream_info(PROBE_STREAM)
            if info.cluster and info.cluster.leader == name:
                return
            with contextlib.suppress(Exception):
                await self.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{PROBE_STREAM}", b"", timeout=5)
            await asyncio.sleep(1.0)
        self.say(f"chaos: could not move {PROBE_STREAM}'s leader to {name}; its gap is measured anyway")

    async def kill_node(self, leader: bool, down_s: float) -> None:
        lead = await self.events_leader()
        if leader:
            await self.align_probe(lead)
            victim = lead
        else:
            probe_leader = self.cluster.index_of((await self.js.stream_info(PROBE_STREAM)).cluster.leader)
            others = [i for i in range(3) if i not in (lead, probe_leader)]
            victim = others[0] if others else next(i for i in range(3) if i != lead)
        await asyncio.sleep(1.0)  # a steady flow before the fault
        f = self.fault("nats_leader_sigkill" if leader else "nats_follower_sigkill",
                       self.cluster.server_name(victim))
        self.cluster.kill(victim)
        if leader:
            await self.until(self._leader_moved(self.cluster.server_name(victim)), 60, "a new DTF_EVENTS leader")
            f.detail["new_leader_after_s"] = round(now() - f.at, 2)
        await asyncio.sleep(down_s)
        await asyncio.to_thread(self.cluster.restart, victim, 60)
        f.detail["restarted_after_s"] = round(now() - f.at, 2)
        self.say(f"chaos: +{now() - self.t0:6.1f}s restarted {self.cluster.server_name(victim)}")

    def _leader_moved(self, old: str) -> Callable[[], Awaitable[bool]]:
        async def moved() -> bool:
            with contextlib.suppress(Exception):
                info = await self.js.stream_info(topology.EVENTS)
                return bool(info.cluster and info.cluster.leader and info.cluster.leader != old)
            return False
        return moved

    # -- the end -------------------------------------------------------------------------------------

    async def wait_all_settled(self, timeout: float) -> None:
        await self.until(lambda: self.settled() == len(self.submitted), timeout, "every task to settle")

    async def projector_caught_up(self) -> bool:
        try:
            tails = {s: (await self.js.stream_info(s)).state.last_seq for s in (topology.EVENTS, topology.HEARTBEATS)}
            reply = json.loads((await self.nc.request(subjects.query("status"), b"{}", timeout=5)).data)
        except (NoRespondersError, nats.errors.Error, TimeoutError):
            return False
        return all(reply.get("checkpoints", {}).get(s, 0) >= seq for s, seq in tails.items())

    async def quiesce(self) -> None:
        """Stop workers (they leave) and coordinators, let the projector catch up, stop it."""
        for name in [n for n in self.procs if n.startswith(("w", "c"))]:
            await asyncio.to_thread(self.stop_process, name)
        await self.until(self.projector_caught_up, 120, "the projector to catch up with both streams")
        await asyncio.to_thread(self.stop_process, "projector")

    async def history(self) -> list[Stored]:
        """DTF_EVENTS from seq 1 with each message's store time (an ordered consumer)."""
        tail = await bus.tail(self.js, topology.EVENTS)
        out: list[Stored] = []
        sub = await self.js.subscribe(subjects.TASKS, stream=topology.EVENTS, ordered_consumer=True,
                                      config=ConsumerConfig(filter_subjects=[subjects.TASKS, subjects.WORKERS]),
                                      pending_msgs_limit=1_000_000, pending_bytes_limit=1 << 30)
        try:
            while not out or out[-1].seq < tail:
                msg = await sub.next_msg(timeout=30)
                meta = msg.metadata
                out.append(Stored(meta.sequence.stream, msg.subject, msg.data, meta.timestamp.timestamp()))
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out


# -- verdict -------------------------------------------------------------------------------------------


def analyse(h: Harness, stored: list[Stored]) -> dict:
    fold = Fold()
    accepted_passed: dict[str, int] = {}
    raw_passed: dict[str, int] = {}
    results: list[tuple[ev.ResultReported, bool, float]] = []
    assigned: list[tuple[ev.TaskAssigned, float]] = []
    dispatch: list[float] = []
    for m in stored:
        try:
            event = ev.decode(m.data)
        except ev.DecodeError:
            event = None
        before = fold.tasks.get(event.task_id) if isinstance(event, ev.TaskEvent) else None
        fold.apply(m.subject, m.seq, m.data)
        if isinstance(event, ev.ResultReported):
            took = fold.tasks.get(event.task_id) is not before
            results.append((event, took, m.stored_at))
            if event.outcome == "passed":
                raw_passed[event.task_id] = raw_passed.get(event.task_id, 0) + 1
                if took:
                    accepted_passed[event.task_id] = accepted_passed.get(event.task_id, 0) + 1
        if isinstance(event, ev.TaskAssigned):
            assigned.append((event, m.stored_at))
        if isinstance(event, (ev.TaskAssigned, ev.ResultReported)):
            dispatch.append(m.stored_at)
    ours = set(h.submitted)
    not_passed = sorted(t for t in ours if fold.tasks.get(t) is None or fold.tasks[t].status != "passed")
    lost = sorted(t for t in ours if accepted_passed.get(t, 0) == 0)
    twice = sorted(t for t in ours if accepted_passed.get(t, 0) > 1)
    ran_twice = sorted(t for t in ours if raw_passed.get(t, 0) > 1)

    figures: dict = {
        "tasks": len(ours), "tasks_lost": len(lost), "tasks_completed_twice": len(twice),
        "tasks_not_passed": len(not_passed), "tasks_with_more_than_one_passed_result_stored": len(ran_twice),
        "heartbeat_timeout_s": h.heartbeat_timeout, "heartbeat_interval_s": h.heartbeat_interval,
        "probe_publish_failures": h.probe.failures,
    }
    problems = [f"task {t} never passed (state {fold.tasks[t].status if t in fold.tasks else 'unseen'})"
                for t in lost[:10]]
    problems += [f"task {t} completed {accepted_passed[t]} times" for t in twice[:10]]

    late_results = []
    for f in h.faults:
        at = f.at
        if f.kind in ("worker_sigkill", "worker_sigstop"):
            task = f.detail["task"]
            nxt = [s for a, s in assigned if a.task_id == task and a.attempt > f.detail["attempt"] and s > at]
            f.detail["reassigned_after_s"] = round(nxt[0] - at, 3) if nxt else None
            if nxt is None or not nxt:
                problems.append(f"{f.kind} {f.target}: marker {task} was never reassigned")
        if f.kind == "worker_sigstop":
            task = f.detail["task"]
            late = [(e, took) for e, took, _ in results if e.task_id == task and e.worker_id == f.target
                    and e.attempt == f.detail["attempt"]]
            f.detail["late_result_stored"] = bool(late)
            f.detail["late_result_settled"] = any(took for _, took in late)
            late_results.append(f.detail)
            if not late:
                problems.append(f"{f.target}'s late result for {task} was not stored")
            if any(took for _, took in late):
                problems.append(f"{f.target}'s late result for {task} settled the task")
        if f.kind.startswith("nats_"):
            later = [g.at for g in h.faults if g.at > at + 0.5]  # up to the next fault, at most 30 s
            until = min([30.0, *(t - at for t in later)])
            gap = longest_gap(dispatch, at, after=until)
            f.detail["dispatch_gap_s"] = round(gap, 3) if gap is not None else None
            gap = longest_gap(h.probe.acks, at, after=until)
            f.detail["probe_publish_gap_s"] = round(gap, 3) if gap is not None else None
            gap = longest_gap(h.events_probe.answers, at, after=until)
            f.detail["events_stream_gap_s"] = round(gap, 3) if gap is not None else None
    figures["faults"] = [{"kind": f.kind, "target": f.target, "at_s": round(f.at - h.t0, 2), **f.detail}
                         for f in h.faults]

    def pick(kind: str, key: str) -> list:
        return [f.detail.get(key) for f in h.faults if f.kind == kind]

    figures["worker_sigkill_to_reassignment_s"] = pick("worker_sigkill", "reassigned_after_s")
    figures["worker_sigstop_to_reassignment_s"] = pick("worker_sigstop", "reassigned_after_s")
    figures["follower_kill_dispatch_gap_s"] = pick("nats_follower_sigkill", "dispatch_gap_s")
    figures["follower_kill_probe_publish_gap_s"] = pick("nats_follower_sigkill", "probe_publish_gap_s")
    figures["leader_kill_dispatch_gap_s"] = pick("nats_leader_sigkill", "dispatch_gap_s")
    figures["leader_kill_probe_publish_gap_s"] = pick("nats_leader_sigkill", "probe_publish_gap_s")
    figures["follower_kill_events_stream_gap_s"] = pick("nats_follower_sigkill", "events_stream_gap_s")
    figures["leader_kill_events_stream_gap_s"] = pick("nats_leader_sigkill", "events_stream_gap_s")
    figures["late_results"] = late_results

    # Throughput: accepted passing results per second, before the first fault vs from it to the end
    # of the fault schedule.
    done_at = sorted(s for e, took, s in results if took and e.outcome == "passed" and e.task_id in ours)
    first_fault = min((f.at for f in h.faults), default=None)
    if done_at and first_fault is not None:
        calm = [t for t in done_at if t < first_fault]
        chaos = [t for t in done_at if first_fault <= t <= h.faults_over]
        calm_span = first_fault - (calm[0] if calm else first_fault)
        figures["throughput_fault_free_tasks_per_s"] = round(len(calm) / calm_span, 2) if calm_span > 0 else None
        span = h.faults_over - first_fault
        figures["throughput_during_faults_tasks_per_s"] = round(len(chaos) / span, 2) if span > 0 else None
        figures["fault_free_s"] = round(calm_span, 1)
        figures["faults_s"] = round(span, 1)
    figures["problems"] = problems
    return figures


async def run(opts: argparse.Namespace, root: Path, say: Callable[[str], None] = print) -> dict:
    h = Harness(root, concurrency=opts.concurrency, say=say, heartbeat_timeout=opts.heartbeat_timeout,
                heartbeat_interval=opts.heartbeat_interval)
    h.faults_over = 0.0
    started = time.monotonic()
    feeder = None
    try:
        await h.start()
        feeder = asyncio.create_task(h.feed(opts.tasks, backlog=3 * h.n_workers * h.concurrency))
        await asyncio.sleep(opts.calm)  # the fault-free phase
        steps: dict[str, Callable[[], Awaitable[None]]] = {
            "worker-kill": h.kill_worker, "worker-stop": h.pause_worker, "coordinator": h.kill_coordinator,
            "follower": lambda: h.kill_node(False, opts.node_down),
            "leader": lambda: h.kill_node(True, opts.node_down), "projector": h.kill_projector,
        }
        schedule = [steps[name] for name in opts.only] * opts.repeat
        for step in schedule:  # in turn
            await step()
            await asyncio.sleep(opts.pause)
        if opts.together:
            say("chaos: together")
            await asyncio.gather(h.kill_worker(), h.kill_coordinator(2), h.kill_projector(),
                                 *([h.kill_node(opts.together_leader, opts.node_down)] if not opts.no_nats else []),
                                 h.pause_worker())
            await asyncio.sleep(opts.pause)
        h.faults_over = now()
        h.feeding = False
        await asyncio.wait_for(feeder, 600)
        await h.wait_all_settled(opts.settle_timeout)
        say(f"chaos: all {len(h.submitted)} tasks settled after {time.monotonic() - started:.0f}s; checking")
        await h.quiesce()
        stored = await h.history()
        figures = analyse(h, stored)
        rebuilt = root / "rebuilt.duckdb"
        await rebuild(h.js, rebuilt)
        diff = await asyncio.to_thread(tables_equal, h.db, rebuilt)
        figures["read_model_differences"] = diff
        figures["rebuilt_equals_live"] = diff == []
        if diff:
            figures["problems"].append(f"rebuilt read model differs: {diff}")
        figures["wall_s"] = round(time.monotonic() - started, 1)
        return figures
    finally:
        if feeder is not None:
            feeder.cancel()
        await h.close()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", type=int, default=500, help="Submit at least this many short tasks.")
    p.add_argument("--quick", action="store_true", help="Shorter phases, no 'together' round (a smoke run).")
    p.add_argument("--concurrency", type=int, default=1, help="Slots per worker.")
    p.add_argument("--heartbeat-interval", type=float, default=0.5)
    p.add_argument("--heartbeat-timeout", type=float, default=2.0)
    p.add_argument("--keep", action="store_true", help="Keep the data dir (logs, stores, databases).")
    p.add_argument("--only", type=lambda v: v.split(","), default=list(FAULTS),
                   help=f"Faults to inflict in turn, comma-separated (default all: {','.join(FAULTS)}).")
    p.add_argument("--repeat", type=int, default=1, help="Inflict the in-turn schedule this many times.")
    p.add_argument("--no-together", dest="together", action="store_false",
                   help="Skip the round of faults together.")
    return p


def configure(opts: argparse.Namespace) -> argparse.Namespace:
    opts.calm = 6.0 if opts.quick else 15.0
    opts.pause = 2.0 if opts.quick else 5.0
    opts.node_down = 3.0 if opts.quick else 6.0
    opts.together = opts.together and not opts.quick
    opts.together_leader = False
    opts.no_nats = False
    unknown = set(opts.only) - set(FAULTS)
    if unknown:
        raise SystemExit(f"chaos: unknown fault(s) {', '.join(sorted(unknown))} (known: {', '.join(FAULTS)})")
    opts.settle_timeout = 300.0
    return opts


def report(figures: dict, say: Callable[[str], None] = print) -> None:
    say("")
    say(f"tasks                         {figures['tasks']}")
    say(f"tasks lost                    {figures['tasks_lost']}")
    say(f"tasks completed twice         {figures['tasks_completed_twice']}")
    say(f"  (tasks with >1 passed result stored, late ones ignored: "
        f"{figures['tasks_with_more_than_one_passed_result_stored']})")
    say(f"worker SIGKILL -> reassigned  {figures['worker_sigkill_to_reassignment_s']} s "
        f"(heartbeat timeout {figures['heartbeat_timeout_s']} s, interval {figures['heartbeat_interval_s']} s)")
    say(f"worker SIGSTOP -> reassigned  {figures['worker_sigstop_to_reassignment_s']} s; late results: "
        + ", ".join(f"stored={d['late_result_stored']} settled={d['late_result_settled']}"
                    for d in figures['late_results']))
    say(f"follower kill: longest dispatch gap {figures['follower_kill_dispatch_gap_s']} s, "
        f"plain publisher gap {figures['follower_kill_probe_publish_gap_s']} s, "
        f"DTF_EVENTS answering gap {figures['follower_kill_events_stream_gap_s']} s")
    say(f"leader kill:   longest dispatch gap {figures['leader_kill_dispatch_gap_s']} s, "
        f"plain publisher gap {figures['leader_kill_probe_publish_gap_s']} s, "
        f"DTF_EVENTS answering gap {figures['leader_kill_events_stream_gap_s']} s")
    say(f"throughput: fault-free {figures.get('throughput_fault_free_tasks_per_s')} tasks/s "
        f"({figures.get('fault_free_s')} s), during faults {figures.get('throughput_during_faults_tasks_per_s')} "
        f"tasks/s ({figures.get('faults_s')} s)")
    say(f"rebuilt read model equals live: {figures['rebuilt_equals_live']}")
    say(f"problems: {figures['problems'] or 'none'}")
    say(json.dumps(figures, sort_keys=True))


def main() -> int:
    opts = configure(parser().parse_args())
    root = Path(tempfile.mkdtemp(prefix="dtf-chaos-"))
    try:
        figures = asyncio.run(run(opts, root))
        report(figures)
        return 1 if figures["problems"] else 0
    finally:
        if opts.keep:
            print(f"chaos: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
