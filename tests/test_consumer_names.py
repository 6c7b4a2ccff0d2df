"""Consumer names pinned per user (dtf.streams.reader, dtf.streams.auth): against a real nats-server with
dtf's users, no reader can create, update or delete a consumer under another's name, whatever create
form it uses, and the victim worker goes on receiving its assignments; a user's pooled reader names are
distinct at once, free again after a read and after a crash."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import textwrap

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.aio.msg import Msg

from dtf import events as ev
from dtf.spec import TaskSpec
from dtf.streams import auth, bus, reader, topology
from dtf.workers.agent import WorkerAgent

SAFETY_S = 60.0
"""Only a guard against hanging forever; nothing here asserts on time."""
SPEC = TaskSpec(type="command", config={"command": "true"})
KEYS = st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ234567", min_size=55, max_size=55).map(lambda s: "U" + s)


# --- without a server ------------------------------------------------------------------------------------


@given(st.integers(0, 2**63), st.integers(1, 2**63), st.integers(0, 2**63), st.booleans(), st.booleans())
def test_a_delivery_reply_gives_its_sequences_and_pending_in_either_form(sseq, dseq, pending, v2, token):
    tail = f"1.{sseq}.{dseq}.1700000000000000000.{pending}"
    reply = f"$JS.ACK._.ACCHASH.S.C.{tail}" + (".tok" if token else "") if v2 else f"$JS.ACK.S.C.{tail}"
    assert reader.ack_fields(reply) == (sseq, dseq, pending)


@given(st.text())
def test_any_other_reply_is_a_clear_value_error(reply):
    try:
        reader.ack_fields(reply)
    except ValueError:
        pass  # the only failure it has


@given(KEYS, KEYS)
def test_two_users_pools_never_share_a_name_nor_take_a_durables(one, other):
    for prefix in (reader.READER, reader.FEED_READER):
        mine, theirs = reader.pool(prefix, one), reader.pool(prefix, other)
        assert len(set(mine)) == reader.POOL_SIZE
        assert one == other or not set(mine) & set(theirs)
        assert not any(name.startswith("worker-") or name == topology.PROJECTOR for name in mine)


def delivery(stream_seq: int, consumer_seq: int, pending: int = 0) -> Msg:
    reply = f"$JS.ACK.S.C.1.{stream_seq}.{consumer_seq}.1700000000000000000.{pending}"
    return Msg(None, subject=f"dtf.worker.w{stream_seq}.registered", reply=reply, data=b"{}")


def heartbeat(last_consumer_seq: int) -> Msg:
    return Msg(None, subject="_INBOX.x", headers={"Status": "100", "Description": "Idle Heartbeat",
                                                  "Nats-Last-Consumer": str(last_consumer_seq)})


def queued(consumer: reader.OrderedConsumer) -> list:
    items = []
    while not consumer._queue.empty():  # noqa: SLF001 - what the caller's `next` would take, in order
        item = consumer._queue.get_nowait()  # noqa: SLF001
        items.append(item.seq if isinstance(item, reader.StoredMsg) else item)
    return items


@given(st.integers(1, 40), st.data())
def test_deliveries_pass_in_order_until_one_is_missing_then_the_consumer_is_made_again(n, data):
    missing = data.draw(st.none() | st.integers(1, n))
    stream_seqs = sorted(data.draw(st.sets(st.integers(1, 10_000), min_size=n, max_size=n)))
    after_last = data.draw(st.booleans())  # nothing after the missing one came: only a heartbeat tells

    async def deliver() -> list:
        consumer = reader.OrderedConsumer(None, "S", ["dtf.worker.>"])
        receive = consumer._receiver(consumer._generation)  # noqa: SLF001 - the subscription's callback
        for dseq, sseq in enumerate(stream_seqs, 1):
            if dseq != missing and not (after_last and missing and dseq > missing):
                await receive(delivery(sseq, dseq, n - dseq))
        await receive(heartbeat(n))  # the server's last delivery, whatever reached us
        return queued(consumer)

    got = asyncio.run(deliver())
    if missing is None:
        assert got == [*stream_seqs, reader.ALIVE]
    else:  # every message before the missing one, then a reset (from the last of them), nothing after
        assert got == [*stream_seqs[:missing - 1], reader.RESET]


def test_no_role_may_create_a_consumer_on_dtfs_streams_by_a_name_it_does_not_own():
    key = "U" + "A" * 55
    for role in ("submitter", "worker", "projector", "detector", "viewer"):
        allowed = auth.permissions(role, "x", key)["publish"]["allow"]
        creates = [s for s in allowed if s.startswith(("$JS.API.CONSUMER.CREATE.", "$JS.API.CONSUMER.DURABLE.",
                                                      "$JS.API.CONSUMER.DELETE."))]
        for stream in (topology.EVENTS, topology.HEARTBEATS, topology.FEED):
            mine = [s for s in creates if s.split(".")[4] == stream]
            assert all(len(s.split(".")) > 5 and s.split(".")[5] != "*" for s in mine), (role, stream)
            names = {s.split(".")[5] for s in mine}
            looks = {s.split(".")[5] for s in allowed if s.startswith(f"$JS.API.CONSUMER.INFO.{stream}.")}
            assert looks <= {"worker-x", "x", "x-hb"}, (role, looks)  # its own durables' info, no one else's
            assert names <= {*reader.pool(reader.READER, key), *reader.pool(reader.FEED_READER, key),
                             "worker-x", "x", "x-hb"}, (role, names)


def test_a_projector_may_not_be_named_like_a_worker_or_a_reader():
    for name in ("worker-w1", "worker", "r-anything", "f-anything"):
        with pytest.raises(auth.AuthError):
            auth.permissions("projector", name, "UKEY")


# --- against a real server -------------------------------------------------------------------------------


class Refusals:
    """A user's connection, counting the server's permission refusals."""

    def __init__(self) -> None:
        self.seen: list[str] = []

    async def on_error(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            self.seen.append(str(exc))


async def until(predicate, what: str) -> None:
    async def poll():
        while not await predicate():
            await asyncio.sleep(0.1)
    try:
        await asyncio.wait_for(poll(), SAFETY_S)
    except TimeoutError:
        pytest.fail(f"never saw {what}")


def create_body(name: str, filter_: str, deliver: str, durable: bool = False) -> bytes:
    config = {"name": name, "deliver_subject": deliver, "filter_subject": filter_, "ack_policy": "none"}
    if durable:
        config["durable_name"] = name
    return json.dumps({"stream_name": topology.EVENTS, "config": config}).encode()


def hijacks(victim: str, filter_: str, own: str, deliver: str) -> list[tuple[str, bytes]]:
    """Every way to create, update or delete consumer `victim`: by the bare, named, filtered and durable
    create subjects, by delete, and by one's own pool name with the victim's in the body."""
    api = "$JS.API.CONSUMER"
    body = create_body(victim, filter_, deliver)
    return [
        (f"{api}.CREATE.{topology.EVENTS}", body),
        (f"{api}.CREATE.{topology.EVENTS}.{victim}", body),
        (f"{api}.CREATE.{topology.EVENTS}.{victim}.{filter_}", body),
        (f"{api}.CREATE.{topology.EVENTS}.{victim}.>", body),
        (f"{api}.DURABLE.CREATE.{topology.EVENTS}.{victim}", create_body(victim, filter_, deliver, durable=True)),
        (f"{api}.DELETE.{topology.EVENTS}.{victim}", b""),
        (f"{api}.CREATE.{topology.EVENTS}.{own}", body),  # the subject's name is the one the server takes
    ]


async def test_no_reader_can_take_over_a_workers_or_the_projectors_durable_and_the_worker_runs_on(
        secured_server, tmp_path):
    admin = await secured_server.connect(secured_server.admin)
    js = admin.jetstream()
    await topology.provision(js)
    await js.add_consumer(topology.EVENTS, topology.projector_consumer())
    w1 = await secured_server.connect(secured_server.creds("worker", "w1"))
    stop = asyncio.Event()
    agent = WorkerAgent(w1, worker_id="w1", cache_dir=tmp_path / "cache", workdir=tmp_path, heartbeat_interval=0.5)
    running = asyncio.create_task(agent.run(stop))
    worker_w1 = ("worker-w1", "dtf.task.*.*.assigned.w1")
    projector = (topology.PROJECTOR, ">")
    attacks = {("viewer", "vic"): [worker_w1, projector], ("worker", "w2"): [worker_w1, projector],
               ("submitter", "bob"): [worker_w1, projector], ("projector", "projector"): [worker_w1]}
    clients = []
    try:
        await until(lambda: consumer_exists(js, "worker-w1"), "worker w1's durable")
        before = {name: (await js.consumer_info(topology.EVENTS, name)).config for name in ("worker-w1", "projector")}
        for (role, name), victims in attacks.items():
            refusals = Refusals()
            nc = await secured_server.connect(secured_server.creds(role, name), error_cb=refusals.on_error)
            clients.append(nc)
            own = reader.pool(reader.READER, reader.user_key(nc))[0]
            attempts = [a for victim, filter_ in victims for a in hijacks(victim, filter_, own, nc.new_inbox())]
            # A refused request is never answered (it times out); the server sends the refusal instead.
            replies = await asyncio.gather(*(nc.request(subject, body, timeout=2) for subject, body in attempts),
                                           return_exceptions=True)
            answers = [json.loads(r.data) for r in replies if not isinstance(r, BaseException)]
            # Only its own name, with the victim's in the body, is answered: the server goes by the subject's.
            assert all("error" in answer or answer["name"] == own for answer in answers), (role, answers)
            assert len(answers) <= len(victims), (role, answers)

            async def all_refused() -> bool:
                return len(refusals.seen) >= len(attempts) - len(answers)  # noqa: B023 - awaited in this iteration

            await until(all_refused, f"every attempt of {role} {name} refused")
        after = {name: (await js.consumer_info(topology.EVENTS, name)).config for name in ("worker-w1", "projector")}
        assert after == before
        await bus.publish(js, ev.TaskSubmitted(id="s-1", run_id="r1", task_id="t1", submitter="alice", spec=SPEC))
        await bus.publish(js, ev.TaskAssigned(id="a-1", run_id="r1", task_id="t1", attempt=1, worker_id="w1",
                                              coordinator="c", spec=SPEC, submitter="alice"))
        messages = bus.read(js, topology.EVENTS, ["dtf.task.r1.t1.result.w1"], follow=True)
        async with contextlib.aclosing(messages):
            result = ev.decode((await asyncio.wait_for(anext(messages), SAFETY_S)).data)
        assert isinstance(result, ev.ResultReported) and result.outcome == "passed"
    finally:
        stop.set()
        await asyncio.wait_for(running, SAFETY_S)
        for nc in (*clients, w1, admin):
            await nc.close()


async def consumer_exists(js, name: str) -> bool:
    return name in [c.name for c in await js.consumers_info(topology.EVENTS)]


async def pooled_consumers(js, stream: str = topology.EVENTS) -> list[str]:
    return [c.name for c in await js.consumers_info(stream) if c.name.startswith(f"{reader.READER}-")]


async def no_pooled_consumers(js) -> bool:
    return not await pooled_consumers(js)


async def test_a_readers_names_are_free_again_once_it_has_read(secured_server):
    admin = await secured_server.connect(secured_server.admin)
    js = admin.jetstream()
    await topology.provision(js)
    await bus.publish(js, ev.WorkerRegistered(worker_id="w1", host="h", pid=1))
    vic = await secured_server.connect(secured_server.creds("viewer", "vic"))
    try:
        for _ in range(2 * reader.POOL_SIZE + 1):  # more reads than names: each gives its name back
            assert [m.subject async for m in bus.read(vic.jetstream(), topology.EVENTS, ["dtf.worker.>"])] == [
                "dtf.worker.w1.registered"]
        assert await pooled_consumers(js) == []
    finally:
        await vic.close()
        await admin.close()


async def test_concurrent_readers_of_one_user_get_distinct_names_and_one_too_many_is_told_so(
        secured_server, monkeypatch):
    admin = await secured_server.connect(secured_server.admin)
    js = admin.jetstream()
    await topology.provision(js)
    for i in range(3):
        await bus.publish(js, ev.WorkerRegistered(worker_id=f"w{i}", host="h", pid=1))
    vic = await secured_server.connect(secured_server.creds("viewer", "vic"))
    readers = [reader.OrderedConsumer(vic.jetstream(), topology.EVENTS, ["dtf.worker.>"])
               for _ in range(reader.POOL_SIZE)]
    try:
        await asyncio.gather(*(r.open() for r in readers))
        names = [r.name for r in readers]
        assert sorted(names) == sorted(reader.pool(reader.READER, reader.user_key(vic)))
        for r in readers:  # each reads the whole stream through its own consumer
            assert [(await r.next()).subject for _ in range(3)] == [f"dtf.worker.w{i}.registered" for i in range(3)]
        monkeypatch.setattr(reader, "POOL_WAIT_S", 1.0)
        with pytest.raises(reader.PoolExhausted, match="too many readers"):
            await reader.OrderedConsumer(vic.jetstream(), topology.EVENTS, ["dtf.worker.>"]).open()
    finally:
        for r in readers:
            await r.close()
        await vic.close()
        await admin.close()


HOLDER = textwrap.dedent("""
    import asyncio, sys
    from dtf.streams import auth, bus, reader, topology

    async def main():
        nc = await bus.connect(sys.argv[1], name="holder", **auth.client_options(sys.argv[2]))
        readers = [reader.OrderedConsumer(nc.jetstream(), topology.EVENTS, ["dtf.worker.>"])
                   for _ in range(reader.POOL_SIZE)]
        await asyncio.gather(*(r.open() for r in readers))
        print("holding", flush=True)
        await asyncio.sleep(3600)

    asyncio.run(main())
""")


async def test_a_crashed_readers_names_are_freed_by_the_server(secured_server):
    admin = await secured_server.connect(secured_server.admin)
    js = admin.jetstream()
    await topology.provision(js)
    await bus.publish(js, ev.WorkerRegistered(worker_id="w1", host="h", pid=1))
    creds = secured_server.creds("viewer", "vic")
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, secured_server.url, str(creds)],
                              stdout=subprocess.PIPE, text=True)
    vic = None
    try:
        assert await asyncio.wait_for(asyncio.to_thread(holder.stdout.readline), SAFETY_S) == "holding\n"
        assert len(await pooled_consumers(js)) == reader.POOL_SIZE  # every name of vic's is taken
        holder.send_signal(signal.SIGKILL)  # no chance to delete them
        await asyncio.to_thread(holder.wait, SAFETY_S)
        vic = await secured_server.connect(creds)
        # The next read waits for a name until the server drops the unheard consumers (INACTIVE_S).
        seen = [m.subject async for m in bus.read(vic.jetstream(), topology.EVENTS, ["dtf.worker.>"])]
        assert seen == ["dtf.worker.w1.registered"]
        await until(lambda: no_pooled_consumers(js), "the crashed reader's consumers dropped")
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
        if vic is not None:
            await vic.close()
        await admin.close()


def test_a_projector_takes_its_durable_name_from_its_credentials_and_refuses_another(tmp_path):
    creds = auth.Registry(tmp_path / "auth").ensure("projector", "projector")
    other = subprocess.run([sys.executable, "-m", "dtf", "projector", "--creds", str(creds), "--name", "proj2",
                            "--nats", "nats://127.0.0.1:1"], capture_output=True, text=True, timeout=120)
    assert other.returncode == 3 and "--name projector" in other.stderr


class MisplacedFirst(reader.OrderedConsumer):
    """An ordered read whose first consumer lands off the stream leader's node, as one may on a
    cluster, and is found out only after it has begun delivering."""

    misplaced: int = 0

    async def _beside_leader(self, info) -> bool:
        if self.misplaced:
            return True
        async def delivering() -> bool:
            return self._queue.qsize() >= 10

        await until(delivering, "the misplaced consumer's first deliveries")
        self.misplaced += 1
        return False


async def test_what_a_misplaced_consumer_delivered_before_it_was_dropped_is_read_again(js):
    await js.add_stream(name="S", subjects=["s.>"])
    for n in range(1, 51):
        await js.publish(f"s.{n}", str(n).encode())
    consumer = MisplacedFirst(js, "S", ["s.>"], near_leader=True)
    try:
        info = await consumer.open()
        assert info.num_pending == 50, "the consumer it kept skips what the dropped one delivered"
        got = [(await asyncio.wait_for(consumer.next(), SAFETY_S)).seq for _ in range(50)]
    finally:
        await consumer.close()
    assert consumer.misplaced == 1
    assert got == list(range(1, 51))
