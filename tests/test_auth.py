"""Roles enforced by the server itself (dtf.streams.auth): against a real nats-server with dtf's users,
each role can do its job and nothing that belongs to another identity; the CLI turns a refusal into
exit code 3; nothing already in the log changes."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from dtf.projections.projector import run_projector
from dtf.streams import auth, buckets, bus, topology
from nats.errors import NoRespondersError

from dtf import events as ev
from dtf import subjects
from dtf.spec import TaskSpec

REFUSAL_S = 10.0
"""Upper bound on waiting for the server's asynchronous -ERR; it normally arrives in milliseconds."""
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
async def log_state(secured_server):
    """The streams provisioned by the admin, with one submitted task of alice's and its result."""
    nc = await secured_server.connect(secured_server.admin)
    js = nc.jetstream()
    await topology.provision(js)
    submitted = ev.TaskSubmitted(id="submit-a-1", run_id="run-a", task_id="run-a-1", submitter="alice",
                                 spec=SPEC)
    await bus.publish(js, submitted)
    await bus.publish(js, ev.WorkerRegistered(worker_id="w1", host="h", pid=1))
    await bus.publish(js, ev.TaskAssigned(id="assign-a-1", run_id="run-a", task_id="run-a-1", attempt=1,
                                          worker_id="w1", coordinator="coordinator", spec=SPEC))
    await bus.publish(js, ev.ResultReported(id="result-a-1", run_id="run-a", task_id="run-a-1", attempt=1,
                                            worker_id="w1", outcome="passed",
                                            tests=[ev.TestOutcome(nodeid="test_a.py::test_one", outcome="passed")]))
    coordinator = await secured_server.connect(secured_server.creds("coordinator", "coordinator"))
    serving = asyncio.create_task(buckets.serve(coordinator, coordinator.jetstream()))  # owners ask it for buckets
    yield nc
    serving.cancel()
    await asyncio.gather(serving, return_exceptions=True)
    await coordinator.close()
    await nc.close()


async def stream_state(nc) -> tuple[int, int]:
    info = await nc.jetstream().stream_info(topology.EVENTS)
    return info.state.messages, info.state.last_seq


class Client:
    """A connection under one user's credentials that records the server's refusals."""

    def __init__(self) -> None:
        self.refusals: list[str] = []
        self.refused = asyncio.Event()
        self.nc = None

    async def on_error(self, exc: Exception) -> None:
        if "permissions violation" in str(exc).lower():
            self.refusals.append(str(exc))
            self.refused.set()

    async def refusal(self) -> str:
        await asyncio.wait_for(self.refused.wait(), REFUSAL_S)
        self.refused.clear()
        return self.refusals[-1]


async def as_user(server, role: str, name: str) -> Client:
    client = Client()
    client.nc = await server.connect(server.creds(role, name), error_cb=client.on_error)
    return client


async def refused_publish(client: Client, event: ev.Event) -> str:
    await client.nc.publish(subjects.subject_for(event), ev.encode(event))
    return await client.refusal()


SPEC = TaskSpec(type="command", config={"command": "true"})


def assignment(worker: str = "w1") -> ev.TaskAssigned:
    return ev.TaskAssigned(id="assign-x", run_id="run-a", task_id="run-a-1", attempt=2, worker_id=worker,
                           coordinator="coord-1", spec=SPEC)


def result(worker: str) -> ev.ResultReported:
    return ev.ResultReported(id=f"result-{worker}", run_id="run-a", task_id="run-a-1", attempt=2, worker_id=worker,
                             outcome="failed")


# --- the permissions themselves, without a server --------------------------------------------------------


def test_a_worker_may_publish_events_only_under_its_own_id():
    allowed = auth.permissions("worker", "w1", "UKEY")["publish"]["allow"]
    own = [s for s in allowed if s.startswith(("dtf.task.", "dtf.worker.", "dtf.hb."))]
    assert own and all(s.endswith(".w1") or ".w1." in s for s in own)
    assert not any(".assigned." in s or ".submitted." in s for s in allowed)


def test_no_role_but_admin_and_coordinator_may_publish_a_coordinator_verdict():
    for role in ("submitter", "worker", "projector", "detector", "viewer"):
        allowed = auth.permissions(role, "x", "UKEY")["publish"]["allow"]
        assert not any(s in ("dtf.task.>", ">") or ".assigned" in s or ".rejected" in s for s in allowed), role


def test_a_name_that_is_not_a_subject_token_is_refused():
    with pytest.raises(auth.AuthError):
        auth.permissions("submitter", "bob.*", "UKEY")
    with pytest.raises(auth.AuthError):
        auth.permissions("root", "bob", "UKEY")


def test_credentials_are_private_and_the_server_config_holds_no_secret(tmp_path):
    registry = auth.Registry(tmp_path / "auth")
    path = registry.ensure("submitter", "alice")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    creds = auth.read_credentials(path)
    assert (creds.role, creds.name) == ("submitter", "alice")
    assert creds.seed not in registry.conf.read_text() and creds.seed not in registry.users_file.read_text()
    assert auth.public_key(creds.seed.encode()) in registry.conf.read_text()
    assert registry.ensure("submitter", "alice") == path and len(registry.users()) == 1


# --- against a real server ------------------------------------------------------------------------------


async def test_a_submitter_cannot_publish_an_assignment_or_a_result_and_the_log_is_untouched(
        secured_server, log_state):
    before = await stream_state(log_state)
    bob = await as_user(secured_server, "submitter", "bob")
    try:
        assert "dtf.task.run-a.run-a-1.assigned.w1" in await refused_publish(bob, assignment())
        assert "dtf.task.run-a.run-a-1.result.w1" in await refused_publish(bob, result("w1"))
        forged = ev.TaskSubmitted(id="forged", run_id="run-b", task_id="run-b-1", submitter="alice",
                                  spec=SPEC)
        assert "submitted.alice" in await refused_publish(bob, forged)
        own = ev.TaskSubmitted(id="own", run_id="run-b", task_id="run-b-1", submitter="bob",
                               spec=SPEC)
        await bus.publish(bob.nc.jetstream(), own)  # its own submission is stored
        await bob.nc.publish("$JS.API.STREAM.PURGE.OBJ_dtf-ws-bob", b"{}", reply=bob.nc.new_inbox())
        assert "purge" in (await bob.refusal()).lower()  # nor wipe the workspaces others depend on
    finally:
        await bob.nc.close()
    messages, last_seq = await stream_state(log_state)
    assert (messages, last_seq) == (before[0] + 1, before[1] + 1)
    stored = await log_state.jetstream().get_msg(topology.EVENTS, seq=last_seq)
    assert stored.subject == "dtf.task.run-b.run-b-1.submitted.bob"


async def test_a_submitter_cannot_read_another_submitters_results(secured_server, log_state):
    bob = await as_user(secured_server, "submitter", "bob")
    alice = await as_user(secured_server, "submitter", "alice")
    try:
        js = bob.nc.jetstream(timeout=2)
        read = asyncio.create_task(js.subscribe(subjects.run_all("run-a"), stream=topology.EVENTS,
                                                ordered_consumer=True))
        assert "$JS.API.CONSUMER.CREATE.DTF_EVENTS".lower() in (await bob.refusal()).lower()
        read.cancel()
        await asyncio.gather(read, return_exceptions=True)
        await bob.nc.publish(f"$JS.API.DIRECT.GET.{topology.EVENTS}", b'{"seq": 2}')
        assert "direct.get" in (await bob.refusal()).lower()
        for subject in ("dtf.query.results", "dtf.query.results.alice"):
            await bob.nc.publish(subject, b"{}", reply=bob.nc.new_inbox())
            assert subject in await bob.refusal()
        alice_inbox = alice.nc.new_inbox()
        await bob.nc.subscribe(alice_inbox.rsplit(".", 1)[0] + ".>")
        assert "subscription" in (await bob.refusal()).lower()
        # its own scope is open: nobody answers it here (no projector), but the server lets it ask
        with pytest.raises(NoRespondersError):
            await bob.nc.request("dtf.query.results.bob", b"{}", timeout=2)
        assert len(bob.refusals) == 5
    finally:
        await bob.nc.close()
        await alice.nc.close()


async def test_a_worker_cannot_publish_as_another_worker(secured_server, log_state):
    before = await stream_state(log_state)
    w1 = await as_user(secured_server, "worker", "w1")
    try:
        assert "result.w2" in await refused_publish(w1, result("w2"))
        assert "dtf.hb.w2" in await refused_publish(w1, ev.WorkerHeartbeat(worker_id="w2"))
        assert "dtf.worker.w2.registered" in await refused_publish(w1, ev.WorkerRegistered(worker_id="w2", host="h", pid=1))
        assert ".assigned.w1" in await refused_publish(w1, assignment("w1"))
        await bus.publish(w1.nc.jetstream(), result("w1"))  # under its own id it may report
    finally:
        await w1.nc.close()
    assert await stream_state(log_state) == (before[0] + 1, before[1] + 1)


async def test_a_viewer_publishes_no_event_or_command_but_reads_the_log(secured_server, log_state):
    before = await stream_state(log_state)
    vic = await as_user(secured_server, "viewer", "vic")
    try:
        for event in (
            ev.TaskSubmitted(id="v", run_id="run-v", task_id="run-v-1", submitter="vic",
                             spec=SPEC),
            ev.TaskCancelled(id="c", run_id="run-a", task_id="run-a-1", reason="no", by="vic"),
            assignment(), result("w1"), ev.WorkerHeartbeat(worker_id="w1"),
            ev.WorkerDrainRequested(worker_id="w1", by="vic"),
        ):
            assert subjects.subject_for(event) in await refused_publish(vic, event)
        seen = [m.subject async for m in bus.read(vic.nc.jetstream(), topology.EVENTS, [subjects.TASKS])]
        assert seen == ["dtf.task.run-a.run-a-1.submitted.alice", "dtf.task.run-a.run-a-1.assigned.w1",
                    "dtf.task.run-a.run-a-1.result.w1"]
    finally:
        await vic.nc.close()
    assert await stream_state(log_state) == before


async def test_new_credentials_work_after_a_reload_without_restarting_the_server(secured_server, log_state):
    pid = secured_server.server.process.pid
    path = secured_server.creds("submitter", "carol", reload=True)
    for _ in range(100):  # the reload is asynchronous in the server
        try:
            nc = await secured_server.connect(path, allow_reconnect=False, max_reconnect_attempts=1)
            break
        except Exception:  # noqa: BLE001 - not reloaded yet: authorization violation
            await asyncio.sleep(0.1)
    else:
        pytest.fail("the new user was never accepted")
    await nc.close()
    assert secured_server.server.process.pid == pid and secured_server.server.process.poll() is None


async def test_revoked_credentials_are_dropped_and_refused_after_a_reload(secured_server, log_state):
    carol = secured_server.creds("submitter", "carol", reload=True)
    nc = None
    for _ in range(100):  # the reload is asynchronous in the server
        try:
            nc = await secured_server.connect(carol, allow_reconnect=False, max_reconnect_attempts=1)
            break
        except Exception:  # noqa: BLE001 - not reloaded yet
            await asyncio.sleep(0.1)
    assert nc is not None and nc.is_connected
    assert [u.name for u in secured_server.registry.revoke("carol")] == ["carol"]
    auth.reload([secured_server.server.pid_file])
    for _ in range(100):
        if nc.is_closed:
            break
        await asyncio.sleep(0.1)
    assert nc.is_closed  # the server dropped the connection of a user it no longer knows
    with pytest.raises(Exception, match="(?i)authorization"):
        await secured_server.connect(carol, allow_reconnect=False, max_reconnect_attempts=1)


# --- the CLI: a refusal is exit code 3 -------------------------------------------------------------------


def dtf(server, creds: Path | None, *args: str, user: str = "bob") -> subprocess.CompletedProcess:
    env = {**os.environ, "USER": user, "LOGNAME": user, "DTF_NATS_URL": server.url}
    env.pop("DTF_CREDS", None)
    if creds is not None:
        env["DTF_CREDS"] = str(creds)
    return subprocess.run([sys.executable, "-m", "dtf", *args], check=False, capture_output=True, text=True, env=env,
                          timeout=120, cwd=ROOT)


async def test_refusals_in_the_cli_exit_3_with_the_reason_and_change_nothing(secured_server, log_state):
    before = await stream_state(log_state)
    bob = secured_server.creds("submitter", "bob")
    vic = secured_server.creds("viewer", "vic")

    def run(*args, **kw):
        return asyncio.to_thread(dtf, secured_server, *args, **kw)

    replay = await run(bob, "replay")
    assert replay.returncode == 3 and "consumer.create" in replay.stderr.lower()
    drain = await run(vic, "worker", "drain", "w1")
    assert drain.returncode == 3 and "dtf.worker.w1.drain" in drain.stderr
    viewer_submit = await run(vic, "submit", "--command", "true", user="vic")
    assert viewer_submit.returncode == 3
    dashboard = await run(bob, "dashboard", "--port", "0")  # said at once, not retried for ever
    assert dashboard.returncode == 3 and "viewer credentials" in dashboard.stderr, dashboard.stderr
    nobody = await run(None, "tasks")
    assert nobody.returncode == 3 and "without credentials" in nobody.stderr
    assert await stream_state(log_state) == before
    own = await run(bob, "submit", "examples/mixed", user="alice")  # ships a workspace, too
    assert own.returncode == 0, own.stderr
    assert (await stream_state(log_state))[0] == before[0] + 1
    # The credentials name the submitter, whatever the login name: bob's submission is bob's.
    last = await log_state.jetstream().get_last_msg(topology.EVENTS, "dtf.task.>")
    assert last.subject.endswith(".submitted.bob")


@pytest.mark.slow
def test_dtf_up_runs_with_auth_and_hands_its_starter_the_admin_credentials(tmp_path):
    env = {**os.environ, "XDG_STATE_HOME": str(tmp_path / "state")}
    for name in ("DTF_NATS_URL", "DTF_CREDS", "DTF_CA"):
        env.pop(name, None)
    up = subprocess.Popen(
        [sys.executable, "-m", "dtf", "up", "--workers", "1", "--data-dir", str(tmp_path / "d"), "--nats-port", "0",
         "--no-dashboard"], stdout=subprocess.PIPE, stderr=(tmp_path / "up.log").open("ab"), env=env, text=True)
    try:
        url_line, creds_line = up.stdout.readline(), up.stdout.readline()
        assert url_line.startswith("export DTF_NATS_URL=nats://127.0.0.1:"), url_line
        assert creds_line.startswith("export DTF_CREDS="), creds_line
        context_file = tmp_path / "d" / "context.json"
        context = json.loads(context_file.read_text())
        assert stat.S_IMODE(context_file.stat().st_mode) == 0o600
        assert context["creds"] == creds_line.strip().split("=", 1)[1]
        assert auth.read_credentials(context["creds"]).role == "admin"

        def cli(*args: str, **extra: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-m", "dtf", *args], check=False, capture_output=True, text=True,
                                  env={**env, **extra}, timeout=120, cwd=tmp_path)

        by_context = cli("submit", "--command", "true", "--wait")
        assert by_context.returncode == 0, by_context.stderr
        url = url_line.strip().split("=", 1)[1]
        assert cli("tasks", "--nats", url).returncode == 3  # a URL takes --creds/$DTF_CREDS only
        added = cli("creds", "add", "--role", "viewer", "--name", "vic", "--out", str(tmp_path / "vic.creds"))
        assert added.returncode == 0, added.stderr
        listed = None
        for _ in range(100):  # the server reloads asynchronously
            listed = cli("workers", "--json", "--nats", url, DTF_CREDS=str(tmp_path / "vic.creds"))
            if listed.returncode == 0:
                break
        assert listed.returncode == 0, listed.stderr
        assert [w["state"] for w in json.loads(listed.stdout)["workers"]] == ["online"]
        workers_log = next((tmp_path / "d" / "logs").glob("worker-*.log")).read_text()
        assert "permissions violation" not in workers_log
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0


# --- integrity: a result only counts from the worker the attempt was assigned to ---------------------


def test_a_result_from_a_worker_that_was_not_assigned_the_attempt_changes_nothing():
    from dtf.state import Fold

    fold = Fold()
    submitted = ev.TaskSubmitted(id="s", run_id="run-a", task_id="run-a-1", submitter="alice", spec=SPEC)
    assigned = ev.TaskAssigned(id="a", run_id="run-a", task_id="run-a-1", attempt=1, worker_id="w1",
                               coordinator="c", spec=SPEC)
    for seq, event in enumerate((submitted, assigned), 1):
        assert fold.apply(subjects.subject_for(event), seq, ev.encode(event)).event is not None
    # w2 may publish under its own id (the server allows it), but the attempt is w1's
    intruder = ev.ResultReported(id="r2", run_id="run-a", task_id="run-a-1", attempt=1, worker_id="w2",
                                 outcome="passed")
    fold.apply(subjects.subject_for(intruder), 3, ev.encode(intruder))
    assert fold.tasks["run-a-1"].status == "assigned" and fold.ignored == 1
    # a result whose payload names w1 but that arrives under w2's subject is set aside as a forgery
    forged = ev.ResultReported(id="r3", run_id="run-a", task_id="run-a-1", attempt=1, worker_id="w1",
                               outcome="passed")
    applied = fold.apply("dtf.task.run-a.run-a-1.result.w2", 4, ev.encode(forged))
    assert applied.event is None and "belongs on dtf.task.run-a.run-a-1.result.w1" in applied.invalid_reason
    assert fold.tasks["run-a-1"].status == "assigned"
    real = ev.ResultReported(id="r1", run_id="run-a", task_id="run-a-1", attempt=1, worker_id="w1",
                             outcome="passed")
    fold.apply(subjects.subject_for(real), 5, ev.encode(real))
    assert fold.tasks["run-a-1"].status == "passed"


async def test_a_worker_takes_its_id_from_its_credentials_and_refuses_another(secured_server, log_state):
    w2 = secured_server.creds("worker", "w2")
    wrong = await asyncio.to_thread(dtf, secured_server, w2, "worker", "--id", "w1")
    assert wrong.returncode == 3 and "--id w2" in wrong.stderr
    env = {**os.environ, "DTF_NATS_URL": secured_server.url, "DTF_CREDS": str(w2)}
    worker = await asyncio.to_thread(
        subprocess.Popen, [sys.executable, "-m", "dtf", "worker", "--cache-dir", str(secured_server.root / "c")],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        reader = bus.read(log_state.jetstream(), topology.EVENTS, ["dtf.worker.w2.registered"], follow=True)
        async with contextlib.aclosing(reader) as messages:
            registered = ev.decode((await anext(messages)).data)
        assert registered.worker_id == "w2"
    finally:
        worker.send_signal(signal.SIGTERM)
        try:
            code = await asyncio.to_thread(worker.wait, 60)
        except subprocess.TimeoutExpired:
            worker.kill()  # never leave it behind
            code = await asyncio.to_thread(worker.wait, 10)
        assert code == 0


async def test_a_submitter_reads_its_own_runs_and_no_one_elses(secured_server, log_state, tmp_path):
    bob = await secured_server.connect(secured_server.creds("submitter", "bob"))
    await bus.publish(bob.jetstream(), ev.TaskSubmitted(id="submit-b-1", run_id="run-b", task_id="run-b-1",
                                                        submitter="bob", spec=SPEC))
    projector = await secured_server.connect(secured_server.creds("projector", "projector"))
    stop = asyncio.Event()
    projecting = asyncio.create_task(run_projector(projector, tmp_path / "model.duckdb", stop))
    try:
        def run(*args):
            return asyncio.to_thread(dtf, secured_server, secured_server.creds("submitter", "bob"), *args)

        while len(json.loads((await run("tasks", "--json")).stdout or '{"tasks": []}')["tasks"]) < 1:
            await asyncio.sleep(0.2)  # the projector catches up
        mine = json.loads((await run("tasks", "--json")).stdout)["tasks"]
        assert [t["task_id"] for t in mine] == ["run-b-1"]  # alice's run-a-1 is not listed
        theirs = await run("results", "--run", "run-a", "--json")
        assert theirs.returncode == 3 and theirs.stdout == ""  # refused, in words
        assert "run run-a is another submitter's: bob may read only its own runs" in theirs.stderr
        def as_admin(*args):
            return json.loads(dtf(secured_server, secured_server.admin, *args).stdout)

        admin = await asyncio.to_thread(as_admin, "tasks", "--json")
        assert sorted(t["task_id"] for t in admin["tasks"]) == ["run-a-1", "run-b-1"]
        assert len((await asyncio.to_thread(as_admin, "results", "--run", "run-a", "--json"))["results"]) == 1
    finally:
        stop.set()
        await projecting
        await projector.close()
        await bob.close()
