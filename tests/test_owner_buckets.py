"""Storage pinned to its owner (dtf.streams.buckets, dtf.streams.auth), against a real nats-server with
dtf's users: a submitter writes only its own workspaces bucket and reads no one else's, a worker
writes and purges only its own artifacts bucket and publishes live output only as itself, and what
an attack tried to reach is still there afterwards. A submitter follows its own running task's live
output with `dtf logs --follow`, and is refused another's."""

from __future__ import annotations

import asyncio
import os
import sys

from test_auth import ROOT, SPEC, as_user, log_state  # noqa: F401 - log_state is a fixture

from dtf import events as ev
from dtf import subjects
from dtf.streams import auth, buckets, bus, feed, objects, topology
from dtf.workers import workspace

DEADLINE_S = 60.0


def test_readers_are_pinned_to_the_exact_buckets_of_the_users_the_server_knows():
    users = [auth.User("submitter", "alice", "A"), auth.User("worker", "w1", "W"), auth.User("admin", "root", "R")]
    worker = auth.permissions("worker", "w1", "W", users)["publish"]["allow"]
    assert "$JS.API.STREAM.INFO.OBJ_dtf-ws-alice" in worker and "$JS.API.STREAM.INFO.OBJ_dtf-ws-root" in worker
    assert "$JS.API.STREAM.PURGE.OBJ_dtf-artifacts-w1" in worker and "$O.dtf-artifacts-w1.>" in worker
    assert not any(s.startswith("$O.dtf-ws-") for s in worker)  # it reads workspaces, never writes them
    submitter = auth.permissions("submitter", "alice", "A", users)
    assert not any("PURGE" in s or "STREAM.CREATE" in s for s in submitter["publish"]["allow"])
    assert "dtf.log.alice.>" in submitter["subscribe"]["allow"]
    for role in ("projector", "detector", "viewer"):
        allowed = auth.permissions(role, "x", "K", users)["publish"]["allow"]
        assert "$JS.API.STREAM.INFO.OBJ_dtf-artifacts-w1" in allowed
        assert not any(s.startswith("$O.") or "PURGE" in s for s in allowed), role


async def test_a_submitter_cannot_read_replace_or_purge_workspaces_and_a_worker_still_fetches_them(
        secured_server, log_state, tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "test_x.py").write_text("def test_x():\n    pass\n")
    data, ref = await asyncio.to_thread(workspace.pack, tmp_path / "src")
    alice, bob = await as_user(secured_server, "submitter", "alice"), await as_user(secured_server, "submitter", "bob")
    w1 = await as_user(secured_server, "worker", "w1")
    try:
        assert await workspace.upload(alice.nc, alice.nc.jetstream(), "alice", data, ref)  # a coordinator made the bucket
        await alice.nc.publish("$JS.API.STREAM.PURGE.OBJ_dtf-ws-alice", b"{}", reply=alice.nc.new_inbox())
        assert "purge.obj_dtf-ws-alice" in (await alice.refusal()).lower()  # not even its own
        for subject in ("$JS.API.STREAM.INFO.OBJ_dtf-ws-alice", "$JS.API.DIRECT.GET.OBJ_dtf-ws-alice",
                        "$JS.API.CONSUMER.CREATE.OBJ_dtf-ws-alice", "$O.dtf-ws-alice.M.forged",
                        "$JS.API.STREAM.CREATE.OBJ_dtf-ws-bob", "dtf.bucket.ws.alice"):
            await bob.nc.publish(subject, b"{}", reply=bob.nc.new_inbox())
            assert subject.lower() in (await bob.refusal()).lower()
        fetched = await workspace.materialize(w1.nc.jetstream(), "alice", ref, tmp_path / "cache")
        assert (fetched / "test_x.py").is_file()
        # A forged ref in bob's run points into bob's bucket only: alice's workspace is not found there.
        try:
            await workspace.materialize(w1.nc.jetstream(), "bob", ref, tmp_path / "cache")
        except workspace.WorkspaceError as exc:
            assert "not in dtf-ws-bob" in str(exc) and exc.category == "data"
        else:
            raise AssertionError("bob's run fetched alice's workspace")
        assert not w1.refusals
    finally:
        for client in (alice, bob, w1):
            await client.nc.close()


async def test_a_worker_cannot_overwrite_or_purge_another_workers_artifacts(secured_server, log_state):
    w1, w2 = await as_user(secured_server, "worker", "w1"), await as_user(secured_server, "worker", "w2")
    vic = await as_user(secured_server, "viewer", "vic")
    try:
        store = await buckets.own(w1.nc, w1.nc.jetstream(), "artifacts", "w1")
        await store.put("logs/run-a-1/1", b"the real log\n")
        await store.put("logs/run-a-1/1", b"the real log, again\n")  # a redelivered attempt overwrites its own
        for subject in ("$JS.API.STREAM.PURGE.OBJ_dtf-artifacts-w1", "$O.dtf-artifacts-w1.M.forged",
                        "$O.dtf-artifacts-w1.C.forged", "dtf.bucket.artifacts.w1"):
            await w2.nc.publish(subject, b"{}", reply=w2.nc.new_inbox())
            assert subject.lower() in (await w2.refusal()).lower()
        own = await buckets.own(w2.nc, w2.nc.jetstream(), "artifacts", "w2")
        await own.put("logs/run-a-1/1", b"forged by w2\n")  # only its own bucket, which no reader takes for w1
        stored = await objects.get(vic.nc.jetstream(), topology.artifacts_bucket("w1"), "logs/run-a-1/1")
        assert stored == b"the real log, again\n"
        assert not w1.refusals
    finally:
        for client in (w1, w2, vic):
            await client.nc.close()


async def publish_fed(js, event: ev.Event, owner: str) -> None:
    """Store an event and feed it to its run's owner, as a coordinator would."""
    ack = await bus.publish(js, event)
    await js.publish(feed.feed_subject(owner, subjects.subject_for(event)), ev.encode(event),
                     headers={"Nats-Msg-Id": str(ack.seq)})


async def read_until(stream: asyncio.StreamReader, text: bytes, seen: bytearray) -> None:
    while text not in seen:
        chunk = await stream.read(4096)
        assert chunk, f"the output ended before {text!r}: {bytes(seen)!r}"
        seen += chunk


async def test_a_submitter_follows_its_own_running_task_and_sees_only_its_assigned_worker(
        secured_server, log_state):
    admin = log_state.jetstream()
    ids = {"run_id": "run-f", "task_id": "run-f-1"}
    await publish_fed(admin, ev.TaskSubmitted(id="submit-f-1", **ids, submitter="alice", spec=SPEC), "alice")
    await publish_fed(admin, ev.TaskAssigned(id="assign-f-1", **ids, attempt=1, worker_id="w1",
                                             coordinator="coordinator", spec=SPEC, submitter="alice"), "alice")
    w1, w2 = await as_user(secured_server, "worker", "w1"), await as_user(secured_server, "worker", "w2")
    bob = await as_user(secured_server, "submitter", "bob")
    env = {**os.environ, "DTF_NATS_URL": secured_server.url}

    async def logs(name: str) -> asyncio.subprocess.Process:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "dtf", "logs", "run-f-1", "--follow", cwd=ROOT,
            env={**env, "DTF_CREDS": str(secured_server.creds("submitter", name))},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)

    following = await logs("alice")
    try:
        # w2 may not speak as w1, and bob may not listen in on alice's tasks
        await w2.nc.publish(subjects.live_log("alice", "run-f-1", "w1"), b"forged as w1\n")
        assert "dtf.log.alice.run-f-1.w1" in await w2.refusal()
        await bob.nc.subscribe("dtf.log.alice.>")
        assert "dtf.log.alice.>" in await bob.refusal()
        seen = bytearray()

        async def keep_talking() -> None:
            while True:
                await w1.nc.publish(subjects.live_log("alice", "run-f-1", "w1"), b"hello from w1\n")
                await asyncio.sleep(0.2)

        talking = asyncio.create_task(keep_talking())
        try:
            await asyncio.wait_for(read_until(following.stdout, b"hello from w1", seen), DEADLINE_S)
        finally:
            talking.cancel()
        # w2 may publish under its own name, but the attempt is w1's: the reader drops it
        await w2.nc.publish(subjects.live_log("alice", "run-f-1", "w2"), b"forged by w2\n")
        await w2.nc.flush()
        await w1.nc.publish(subjects.live_log("alice", "run-f-1", "w1"), b"the last words\n")
        await asyncio.wait_for(read_until(following.stdout, b"the last words", seen), DEADLINE_S)
        await publish_fed(admin, ev.ResultReported(id="result-f-1", **ids, attempt=1, worker_id="w1",
                                                   outcome="passed"), "alice")
        out, err = await asyncio.wait_for(following.communicate(), DEADLINE_S)
        seen += out
        assert following.returncode == 0, err.decode()
        assert b"forged" not in seen

        theirs = await logs("bob")
        _, err = await asyncio.wait_for(theirs.communicate(), DEADLINE_S)
        assert theirs.returncode == 3 and "no task run-f-1 among bob's tasks" in err.decode()
    finally:
        if following.returncode is None:
            following.kill()
            await following.wait()
        for client in (w1, w2, bob):
            await client.nc.close()



def test_every_owners_bucket_is_kept_beside_the_events_leader():
    from dtf.streams import placement

    names = ["DTF_EVENTS", "OBJ_dtf-ws-alice", "OBJ_dtf-artifacts-w1", "OBJ_other", "KV_x"]
    assert placement.owner_buckets(names) == ["OBJ_dtf-artifacts-w1", "OBJ_dtf-ws-alice"]


async def test_a_bad_bucket_request_gets_an_error_and_the_service_goes_on(nc, js):
    serving = asyncio.create_task(buckets.serve(nc, js))
    try:
        await asyncio.sleep(0.1)
        for subject in ("dtf.bucket.kv.alice", "dtf.bucket.ws.*"):
            reply = await nc.request(subject, b"", timeout=5)
            assert b"error" in reply.data, subject
        store = await buckets.own(nc, js, "ws", "alice")  # asks the service, which makes it
        assert (await js.stream_info(f"OBJ_{topology.workspaces_bucket('alice')}")).config.num_replicas == 1
        assert store is not None
    finally:
        serving.cancel()
        await asyncio.gather(serving, return_exceptions=True)
