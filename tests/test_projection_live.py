"""The live projector against a real nats-server: it catches up with a realistic history, equals a
rebuild table for table, resumes from its checkpoint, shrugs off redelivery, and answers queries
over NATS while it holds the DuckDB file."""

import asyncio
import contextlib
import json
import sys

import pytest
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig

from dtf import events as ev
from dtf import subjects
from dtf.projections import consumers, sample
from dtf.projections.projection import Projection
from dtf.projections.projector import run_projector
from dtf.projections.rebuild import rebuild, tables_equal
from dtf.spec import TaskSpec
from dtf.streams import bus, topology


async def ask(nc, name, request=b""):
    """A query reply; retried while the service is not subscribed yet (no responders)."""
    while True:
        try:
            reply = await nc.request(subjects.query(name), request, timeout=5)
        except (NoRespondersError, NatsTimeout):
            await asyncio.sleep(0.05)
            continue
        return json.loads(reply.data)


async def caught_up(nc, js):
    """Wait until the projector's checkpoints reach the end of both streams."""
    while True:
        ends = {
            stream: (await js.stream_info(stream)).state.last_seq
            for stream in (topology.EVENTS, topology.HEARTBEATS)
        }
        checkpoints = (await ask(nc, "status"))["checkpoints"]
        if all(checkpoints.get(stream, 0) >= last for stream, last in ends.items()):
            return
        await asyncio.sleep(0.05)


async def jetstream_back(nc, js):
    """Wait until the client has reconnected and JetStream answers again."""
    while not nc.is_connected:
        await asyncio.sleep(0.05)
    while True:
        try:
            await js.account_info()
            return
        except Exception:  # noqa: BLE001 - any error here means "not yet"
            await asyncio.sleep(0.1)


@contextlib.asynccontextmanager
async def projector(nc, path):
    stop = asyncio.Event()
    task = asyncio.create_task(run_projector(nc, path, stop, fetch_timeout=0.5))
    try:
        yield task
    finally:
        stop.set()
        await task


async def test_a_live_projection_equals_a_rebuild_from_the_streams(nc, js, tmp_path):
    live = tmp_path / "live.duckdb"
    async with projector(nc, live):
        await sample.publish_history(js, sample.history("r1"))
        await caught_up(nc, js)
        tasks = (await ask(nc, "tasks", b'{"run_id": "r1"}'))["tasks"]
    assert {t["task_id"]: t["state"] for t in tasks}["r1-t2"] == "failed"

    counts = await rebuild(js, tmp_path / "rebuilt.duckdb")
    assert counts["invalid"] == 3 and counts["duplicates"] == 2 and counts["ignored"] == 1
    assert tables_equal(live, tmp_path / "rebuilt.duckdb") == []
    with Projection.open(live) as projection:
        # The t2 result's tests were fetched from the artifacts store, once.
        assert projection.con.execute(
            "SELECT count(*) FROM test_results WHERE task_id = 'r1-t2'").fetchone() == (3,)


async def test_a_restarted_projector_resumes_from_its_checkpoint_without_duplicating_rows(
    nc, js, tmp_path, monkeypatch,
):
    live = tmp_path / "live.duckdb"
    async with projector(nc, live):
        await sample.publish_history(js, sample.history("r1"))
        await caught_up(nc, js)
    with Projection.open(live) as projection:
        checkpoint = projection.checkpoint(topology.EVENTS)

    applied_seqs = []
    original = Projection.apply_batch

    def recording(self, messages, tests=None):
        applied_seqs.extend(m.seq for m in messages if m.stream == topology.EVENTS)
        return original(self, messages, tests)

    monkeypatch.setattr(Projection, "apply_batch", recording)
    await sample.publish_history(js, sample.history("r2"))
    async with projector(nc, live):
        await caught_up(nc, js)
    assert applied_seqs and min(applied_seqs) == checkpoint + 1

    await rebuild(js, tmp_path / "rebuilt.duckdb")
    assert tables_equal(live, tmp_path / "rebuilt.duckdb") == []


async def test_redelivering_the_whole_stream_changes_nothing(nc, js, tmp_path):
    live = tmp_path / "live.duckdb"
    async with projector(nc, live):
        await sample.publish_history(js, sample.history("r1"))
        await caught_up(nc, js)
    before = tmp_path / "before.duckdb"
    before.write_bytes(live.read_bytes())

    # Rewind the durable consumer to the start: every message arrives again.
    await js.delete_consumer(topology.EVENTS, topology.PROJECTOR)
    await js.add_consumer(topology.EVENTS, topology.projector_consumer())
    async with projector(nc, live):
        while (await js.consumer_info(topology.EVENTS, topology.PROJECTOR)).num_ack_pending or (
            await js.consumer_info(topology.EVENTS, topology.PROJECTOR)
        ).num_pending:
            await asyncio.sleep(0.05)
    assert tables_equal(before, live) == []


async def test_a_new_database_is_filled_from_the_start_even_if_the_consumer_had_acked_everything(
    nc, js, tmp_path,
):
    async with projector(nc, tmp_path / "first.duckdb"):
        await sample.publish_history(js, sample.history("r1"))
        await caught_up(nc, js)
    second = tmp_path / "second.duckdb"
    async with projector(nc, second):
        await caught_up(nc, js)
    await rebuild(js, tmp_path / "rebuilt.duckdb")
    assert tables_equal(second, tmp_path / "rebuilt.duckdb") == []


async def test_queries_answer_while_the_projector_holds_the_database_lock(nc, js, tmp_path):
    live = tmp_path / "live.duckdb"
    async with projector(nc, live):
        await ask(nc, "status")
        other_process = await asyncio.create_subprocess_exec(
            sys.executable, "-c", "import duckdb, sys; duckdb.connect(sys.argv[1], read_only=True)",
            str(live), stderr=asyncio.subprocess.PIPE,
        )
        _, stderr = await other_process.communicate()
        assert other_process.returncode != 0 and b"lock" in stderr

        spec = TaskSpec(type="command", config={"command": "true"})
        publishing = asyncio.create_task(bus.publish_many(js, [
            ev.TaskSubmitted(run_id="load", task_id=f"t{i}", submitter="ci", spec=spec)
            for i in range(2000)
        ]))
        seen = []
        while not seen or seen[-1] < 2000:
            seen.append((await ask(nc, "status"))["tasks"])
        await publishing
        tasks = (await ask(nc, "tasks", b'{"run_id": "load", "limit": 10}'))
    assert seen == sorted(seen) and seen[-1] == 2000
    assert len(tasks["tasks"]) == 10 and tasks["next_offset"] == 10


async def test_a_bad_query_gets_an_error_reply_and_the_service_keeps_answering(nc, js, tmp_path):
    async with projector(nc, tmp_path / "live.duckdb"):
        await sample.publish_history(js, sample.history("r1"))
        await caught_up(nc, js)
        for name, body in [("tasks", b"\xff\xfe"), ("results", b'{"offset": "x"}'), ("workers", b"[1]")]:
            reply = await ask(nc, name, body)
            assert "error" in reply
        assert len((await ask(nc, "workers"))["workers"]) == 2
        page = await ask(nc, "results", b'{"run_id": "r1", "limit": 4}')
        assert len(page["results"]) == 4 and page["next_offset"] == 4


async def test_a_message_after_a_gap_waits_unless_the_gap_is_empty(js):
    history = sample.history("r1")
    await sample.publish(js, history.events[:3])
    stored = [m async for m in bus.read(js, topology.EVENTS, [subjects.TASKS, subjects.WORKERS])]
    ready, held = await consumers.in_order(js, [stored[0], stored[2]], checkpoint=0)
    assert [m.seq for m in ready] == [1] and [m.seq for m in held] == [3]

    await js.purge_stream(topology.EVENTS, subject=stored[1].subject)
    ready, held = await consumers.in_order(js, [stored[0], stored[2]], checkpoint=0)
    assert [m.seq for m in ready] == [1, 3] and held == []


async def test_a_consumer_ahead_of_the_database_is_recreated_to_start_after_the_checkpoint(js):
    await sample.publish(js, sample.history("r1").events)
    await js.add_consumer(topology.EVENTS, topology.projector_consumer())
    psub = await js.pull_subscribe_bind(durable=topology.PROJECTOR, stream=topology.EVENTS)
    for msg in await psub.fetch(10, timeout=2):
        await msg.ack_sync()
    await consumers.ensure_consumer(js, topology.EVENTS, checkpoint=4)
    info = await js.consumer_info(topology.EVENTS, topology.PROJECTOR)
    assert info.num_pending == 35 - 4 and info.ack_floor.stream_seq == 4
    assert isinstance(info.config, ConsumerConfig) and info.config.opt_start_seq == 5


async def test_the_projector_carries_on_after_the_server_restarts(nats_server, nc, js, tmp_path):
    live = tmp_path / "live.duckdb"
    async with projector(nc, live):
        await sample.publish_history(js, sample.history("r1"))
        await caught_up(nc, js)
        nats_server.stop()
        nats_server.start()
        await jetstream_back(nc, js)
        await sample.publish_history(js, sample.history("r2"))
        await caught_up(nc, js)
    await rebuild(js, tmp_path / "rebuilt.duckdb")
    assert tables_equal(live, tmp_path / "rebuilt.duckdb") == []


async def test_a_projector_cancelled_mid_stream_leaves_a_database_that_resumes_cleanly(nc, js, tmp_path):
    live = tmp_path / "live.duckdb"
    spec = TaskSpec(type="command", config={"command": "true"})
    await bus.publish_many(js, [
        ev.TaskSubmitted(run_id="load", task_id=f"t{i}", submitter="ci", spec=spec) for i in range(3000)
    ])
    task = asyncio.create_task(run_projector(nc, live, asyncio.Event(), fetch_timeout=0.5))
    while (await ask(nc, "status"))["tasks"] == 0:
        await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    with Projection.open(live) as projection:  # closed: this process can open it again
        checkpoint = projection.checkpoint(topology.EVENTS)
        assert projection.con.execute("SELECT count(*) FROM tasks").fetchone() == (checkpoint,)
    async with projector(nc, live):
        await caught_up(nc, js)
    await rebuild(js, tmp_path / "rebuilt.duckdb")
    assert tables_equal(live, tmp_path / "rebuilt.duckdb") == []
