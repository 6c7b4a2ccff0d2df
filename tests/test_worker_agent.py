"""The worker agent against a real nats-server: the test plays the submitter and the coordinator by
publishing TaskSubmitted/TaskAssigned itself, runs a WorkerAgent until a stop event, and checks what
the agent wrote to the bus and the object store."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import textwrap

import pytest

from dtf import events as ev
from dtf.spec import TaskSpec
from dtf.streams import bus, topology
from dtf.workers import workspace
from dtf.workers.agent import WorkerAgent

SAFETY_S = 30.0
"""Only a guard against hanging forever; nothing here asserts on time."""


def command(cmd: str) -> TaskSpec:
    return TaskSpec(type="command", config={"command": cmd})


async def submit(js, task_id: str, spec: TaskSpec, run_id: str = "r1") -> None:
    await bus.publish(js, ev.TaskSubmitted(
        id=f"submit-{task_id}", run_id=run_id, task_id=task_id, submitter="alice", spec=spec))


async def assign(js, task_id: str, spec: TaskSpec, worker_id: str = "w1", attempt: int = 1,
                 run_id: str = "r1") -> int:
    ack = await bus.publish(js, ev.TaskAssigned(
        id=f"assign-{task_id}-{attempt}", run_id=run_id, task_id=task_id, attempt=attempt,
        worker_id=worker_id, coordinator="c", spec=spec, submitter="alice"))
    return ack.seq


async def submit_and_assign(js, task_id: str, spec: TaskSpec, **kwargs) -> int:
    await submit(js, task_id, spec)
    return await assign(js, task_id, spec, **kwargs)


def decoded(data: bytes) -> ev.Event | None:
    try:
        return ev.decode(data)
    except ev.DecodeError:
        return None


async def wait_for(js, predicate, filters=("dtf.>",), stream=topology.EVENTS):
    """The first stored (subject, event) matching predicate, waiting for it to be published."""
    async def scan():
        reader = bus.read(js, stream, list(filters), follow=True)
        async with contextlib.aclosing(reader):
            async for msg in reader:
                event = decoded(msg.data)
                if event is not None and predicate(event):
                    return msg.subject, event
    return await asyncio.wait_for(scan(), SAFETY_S)


async def stored(js, filters=("dtf.>",)) -> list[tuple[str, ev.Event]]:
    return [(m.subject, decoded(m.data)) async for m in bus.read(js, topology.EVENTS, list(filters))]


def of(kind, task_id: str | None = None):
    return lambda e: isinstance(e, kind) and (task_id is None or getattr(e, "task_id", None) == task_id)


async def consumer_settled(js, worker_id: str, seq: int) -> None:
    """Wait until the worker's consumer delivered everything up to seq and holds nothing unacked."""
    async def poll():
        while True:
            info = await js.consumer_info(topology.EVENTS, f"worker-{worker_id}")
            if info.delivered.stream_seq >= seq and info.num_ack_pending == 0 and info.num_pending == 0:
                return
            await asyncio.sleep(0.05)
    await asyncio.wait_for(poll(), SAFETY_S)


@contextlib.asynccontextmanager
async def running_agent(nats_server, js, tmp_path, *, worker_id="w1", wait_registered=True, **options):
    client = await bus.connect(nats_server.url, name=f"worker-{worker_id}")
    stop = asyncio.Event()
    agent = WorkerAgent(
        client, worker_id=worker_id, concurrency=options.pop("concurrency", 1), tags={"pool": "test"},
        cache_dir=tmp_path / "cache", workdir=tmp_path, python=options.pop("python", sys.executable),
        heartbeat_interval=0.2, drain_grace=options.pop("drain_grace", 5.0), fetch_timeout=0.25, **options,
    )
    task = asyncio.create_task(agent.run(stop))
    try:
        if wait_registered:
            await wait_for(js, lambda e: isinstance(e, ev.WorkerRegistered) and e.worker_id == worker_id)
        yield agent, stop
        stop.set()
        await asyncio.wait_for(task, SAFETY_S)
    finally:
        stop.set()
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await client.close()


async def test_an_assigned_command_is_started_and_reported_on_the_workers_subjects(nats_server, js, nc, tmp_path):
    live: list[bytes] = []

    async def on_live(msg) -> None:
        live.append(msg.data)

    live_sub = await nc.subscribe("dtf.log.alice.t1.w1", cb=on_live)
    async with running_agent(nats_server, js, tmp_path):
        await submit_and_assign(js, "t1", command("yes filler | head -n 1000; echo hello-from-t1"))
        subject, result = await wait_for(js, of(ev.ResultReported, "t1"))
        await consumer_settled(js, "w1", 2)
    await live_sub.unsubscribe()

    assert subject == "dtf.task.r1.t1.result.w1"
    assert (result.id, result.attempt, result.worker_id, result.outcome) == ("result-t1-1", 1, "w1", "passed")
    assert result.counts.passed == 1 and "hello-from-t1" in result.output_tail
    history = await stored(js, ["dtf.task.r1.t1.>"])
    assert [s for s, _ in history] == [
        "dtf.task.r1.t1.submitted.alice", "dtf.task.r1.t1.assigned.w1",
        "dtf.task.r1.t1.started.w1", "dtf.task.r1.t1.result.w1",
    ]
    started = history[2][1]
    assert (started.attempt, started.worker_id) == (1, "w1")

    store = await js.object_store(topology.artifacts_bucket("w1"))
    assert result.log_ref == "logs/t1/1"
    assert b"hello-from-t1" in (await store.get(result.log_ref)).data
    assert b"hello-from-t1" in b"".join(live)

    lifecycle = await stored(js, ["dtf.worker.w1.>"])
    assert [s for s, _ in lifecycle] == ["dtf.worker.w1.registered", "dtf.worker.w1.left"]
    registered = lifecycle[0][1]
    assert registered.capabilities.tags == {"pool": "test"} and registered.concurrency == 1
    heartbeats = [m async for m in bus.read(js, topology.HEARTBEATS, ["dtf.hb.w1"])]
    assert len(heartbeats) == 1  # the stream keeps the last one per worker


async def test_a_short_output_travels_in_the_event_without_a_stored_log(nats_server, js, tmp_path):
    async with running_agent(nats_server, js, tmp_path):
        await submit_and_assign(js, "t1", command("echo short"))
        _, result = await wait_for(js, of(ev.ResultReported, "t1"))
    assert result.log_ref is None and result.output_tail == "short\n"


async def test_an_assignment_beyond_capacity_is_released_while_heartbeats_list_the_running_one(nats_server, js, tmp_path):
    async with running_agent(nats_server, js, tmp_path, concurrency=1, drain_grace=0):
        await submit_and_assign(js, "long", command("sleep 30"))
        await wait_for(js, of(ev.TaskStarted, "long"))
        await wait_for(js, lambda e: isinstance(e, ev.WorkerHeartbeat) and e.running == ["long"],
                       filters=["dtf.hb.w1"], stream=topology.HEARTBEATS)
        await submit_and_assign(js, "extra", command("true"))
        subject, released = await wait_for(js, of(ev.TaskReleased, "extra"))
    assert subject == "dtf.task.r1.extra.released.w1"
    assert released.reason == "worker at capacity (1)" and released.attempt == 1
    assert not [e for _, e in await stored(js, ["dtf.task.r1.extra.>"]) if isinstance(e, ev.TaskStarted)]


async def test_a_worker_runs_up_to_its_concurrency_at_the_same_time(nats_server, js, tmp_path):
    """Each task waits for the other's file: both can only pass if they run side by side."""
    def meet(mine: str, theirs: str) -> TaskSpec:
        return TaskSpec(type="command", timeout_seconds=20, config={
            "command": f"touch {mine}; while [ ! -f {theirs} ]; do sleep 0.05; done"})

    async with running_agent(nats_server, js, tmp_path, concurrency=2):
        await submit_and_assign(js, "a", meet("a.flag", "b.flag"))
        await submit_and_assign(js, "b", meet("b.flag", "a.flag"))
        _, first = await wait_for(js, of(ev.ResultReported, "a"))
        _, second = await wait_for(js, of(ev.ResultReported, "b"))
    assert (first.outcome, second.outcome) == ("passed", "passed")


async def test_stopping_releases_attempts_that_outlive_the_drain_grace(nats_server, js, tmp_path):
    async with running_agent(nats_server, js, tmp_path, drain_grace=0.2) as (agent, _):
        seq = await submit_and_assign(js, "slow", command("sleep 30"))
        await wait_for(js, of(ev.TaskStarted, "slow"))
    _, released = await wait_for(js, of(ev.TaskReleased, "slow"))
    assert released.reason == "worker stopping" and released.worker_id == "w1"
    assert not [e for _, e in await stored(js, ["dtf.task.r1.slow.>"]) if isinstance(e, ev.ResultReported)]
    await consumer_settled(js, "w1", seq)
    assert agent.attempts == {}
    await wait_for(js, of(ev.WorkerLeft))


async def test_stopping_lets_a_running_attempt_finish_within_the_drain_grace(nats_server, js, tmp_path):
    async with running_agent(nats_server, js, tmp_path, drain_grace=20):
        await submit_and_assign(js, "short", command("sleep 0.5; echo finished"))
        await wait_for(js, of(ev.TaskStarted, "short"))
    _, result = await wait_for(js, of(ev.ResultReported, "short"))
    assert result.outcome == "passed" and "finished" in result.output_tail
    assert not [e for _, e in await stored(js, ["dtf.task.r1.short.>"]) if isinstance(e, ev.TaskReleased)]


def result_for(task_id: str) -> ev.ResultReported:
    return ev.ResultReported(id=f"result-{task_id}-1", run_id="r1", task_id=task_id, attempt=1,
                             worker_id="w1", outcome="passed")


@pytest.mark.parametrize("moved_on", ["finished", "cancelled", "reassigned", "taken back"])
async def test_a_stale_assignment_is_acknowledged_and_skipped(nats_server, js, tmp_path, moved_on):
    """A restarted worker gets its unacknowledged assignments again; work that already finished or
    moved on must not run twice."""
    await js.add_consumer(topology.EVENTS, topology.worker_consumer("w1"))  # the earlier incarnation's
    spec = command("touch ran")
    seq = await submit_and_assign(js, "t1", spec)
    if moved_on == "finished":
        await bus.publish(js, result_for("t1"))
    elif moved_on == "cancelled":
        await bus.publish(js, ev.TaskCancelled(run_id="r1", task_id="t1", by="alice"))
    elif moved_on == "taken back":  # the coordinator's start deadline passed first
        await bus.publish(js, ev.TaskFailed(id="unstarted-t1-1", run_id="r1", task_id="t1", attempt=1,
                                            worker_id="w1", category="worker", reason="not started"))
    else:
        await bus.publish(js, ev.TaskReleased(run_id="r1", task_id="t1", attempt=1, worker_id="w1",
                                              reason="lost"))
        await assign(js, "t1", spec, worker_id="w2", attempt=2)
    async with running_agent(nats_server, js, tmp_path):
        await consumer_settled(js, "w1", seq)
    events = [e for _, e in await stored(js, ["dtf.task.r1.t1.>"])]
    assert not [e for e in events if isinstance(e, ev.TaskStarted)]
    assert not (tmp_path / "ran").exists()


async def test_an_assignment_followed_only_by_messages_that_do_not_concern_it_still_runs(nats_server, js, tmp_path):
    """A forged submission on the task's subjects and the coordinator's rejection of it are the task's
    last messages, yet nothing superseded the assignment."""
    await js.add_consumer(topology.EVENTS, topology.worker_consumer("w1"))
    await submit_and_assign(js, "t1", command("echo still-mine"))
    await js.publish("dtf.task.r1.t1.submitted.mallory", b"not an event")
    await bus.publish(js, ev.TaskRejected(run_id="r1", task_id="t1", reason="not an event", source_seq=3))
    async with running_agent(nats_server, js, tmp_path):
        _, result = await wait_for(js, of(ev.ResultReported, "t1"))
    assert result.outcome == "passed" and "still-mine" in result.output_tail


async def test_a_restarted_worker_reruns_an_attempt_it_had_started(nats_server, js, tmp_path):
    await js.add_consumer(topology.EVENTS, topology.worker_consumer("w1"))
    await submit_and_assign(js, "t1", command("echo again"))
    await bus.publish(js, ev.TaskStarted(id="started-t1-1", run_id="r1", task_id="t1", attempt=1,
                                         worker_id="w1"))
    async with running_agent(nats_server, js, tmp_path):
        _, result = await wait_for(js, of(ev.ResultReported, "t1"))
    assert result.outcome == "passed" and "again" in result.output_tail


async def test_a_cancelled_task_is_killed_and_reported_cancelled(nats_server, js, tmp_path):
    async with running_agent(nats_server, js, tmp_path):
        await submit_and_assign(js, "t1", command("sleep 30"))
        await wait_for(js, of(ev.TaskStarted, "t1"))
        await bus.publish(js, ev.TaskCancelled(run_id="r1", task_id="t1", by="alice", reason="changed my mind"))
        _, result = await wait_for(js, of(ev.ResultReported, "t1"))
    assert result.outcome == "cancelled"


async def test_a_cancel_by_someone_other_than_the_submitter_kills_nothing(nats_server, js, tmp_path):
    async with running_agent(nats_server, js, tmp_path):
        await submit_and_assign(js, "t1", command("sleep 1; echo finished"))
        await wait_for(js, of(ev.TaskStarted, "t1"))
        await bus.publish(js, ev.TaskCancelled(run_id="r1", task_id="t1", by="mallory", reason="forged"))
        _, result = await wait_for(js, of(ev.ResultReported, "t1"))
    assert result.outcome == "passed" and "finished" in result.output_tail


async def test_a_test_task_runs_in_a_private_copy_of_its_uploaded_workspace(nats_server, js, tmp_path):
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_it.py").write_text(textwrap.dedent("""
        from pathlib import Path

        def test_data_file_came_along():
            assert Path("data.txt").read_text() == "payload"

        def test_writing_into_the_workspace():
            Path("written.txt").write_text("by the task")
    """))
    (project / "data.txt").write_text("payload")
    data, ref = await asyncio.to_thread(workspace.pack, project)
    await workspace.upload(js._nc, js, "alice", data, ref)
    spec = TaskSpec(type="test", config={"paths": ["tests"]}, workspace=ref)
    async with running_agent(nats_server, js, tmp_path):
        await submit_and_assign(js, "t1", spec)
        _, result = await wait_for(js, of(ev.ResultReported, "t1"))
    assert result.outcome == "passed", result.output_tail
    assert result.counts.passed == 2
    cached = tmp_path / "cache" / "workspaces" / "w1" / "alice" / ref.sha256
    assert (cached / "data.txt").read_text() == "payload"
    assert not (cached / "written.txt").exists()  # each attempt runs in its own copy
    assert not list(cached.rglob("__pycache__"))


async def test_two_workers_sharing_a_cache_dir_each_unpack_a_workspace_of_their_own(nats_server, js, tmp_path):
    """Which unpacked trees are intact only the worker that unpacked them knows: sharing one, a second
    worker (another process) would take it for changed and remove it while the first copies from it."""
    project = tmp_path / "project"
    project.mkdir()
    (project / "data.txt").write_text("payload")
    data, ref = await asyncio.to_thread(workspace.pack, project)
    await workspace.upload(js._nc, js, "alice", data, ref)
    spec = TaskSpec(type="command", config={"command": "cat data.txt"}, workspace=ref)
    for worker_id, task_id in (("w1", "t1"), ("w2", "t2")):
        async with running_agent(nats_server, js, tmp_path, worker_id=worker_id):
            await submit_and_assign(js, task_id, spec, worker_id=worker_id)
            _, result = await wait_for(js, of(ev.ResultReported, task_id))
        assert result.outcome == "passed" and "payload" in result.output_tail, result.output_tail
    for worker_id in ("w1", "w2"):
        assert (tmp_path / "cache" / "workspaces" / worker_id / "alice" / ref.sha256 / "data.txt").is_file()


async def test_a_missing_workspace_fails_the_attempt_as_a_data_error(nats_server, js, tmp_path):
    ref = workspace.WorkspaceRef(sha256="0" * 64, size=1, files=1)
    async with running_agent(nats_server, js, tmp_path):
        await submit_and_assign(js, "t1", TaskSpec(type="command", config={"command": "true"}, workspace=ref))
        subject, failed = await wait_for(js, of(ev.TaskFailed, "t1"))
    assert subject == "dtf.task.r1.t1.failed.w1"
    assert (failed.id, failed.category) == ("failed-t1-1", "data")
    assert "is not in dtf-ws-alice" in failed.reason


async def test_the_worker_keeps_taking_assignments_after_the_server_restarts(nats_server, js, nc, tmp_path):
    async with running_agent(nats_server, js, tmp_path) as (agent, _):
        await submit_and_assign(js, "before", command("echo one"))
        await wait_for(js, of(ev.ResultReported, "before"))
        await asyncio.to_thread(nats_server.stop)
        await asyncio.to_thread(nats_server.start)  # same port, same JetStream store
        await asyncio.wait_for(_reconnected(agent.nc, nc), SAFETY_S)
        await submit_and_assign(js, "after", command("echo two"))
        _, result = await wait_for(js, of(ev.ResultReported, "after"))
    assert result.outcome == "passed"


async def _reconnected(*clients) -> None:
    while not all(c.is_connected and c.stats["reconnects"] > 0 for c in clients):
        await asyncio.sleep(0.05)
