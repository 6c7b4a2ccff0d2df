"""A CI job holding only submitter credentials follows its own run to its verdict, from its own feed
(dtf.streams.feed), and sees nothing of another submitter's runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from dtf.streams import auth, feed, reader, topology
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from auth_up import dtf_up


def test_a_submitter_waits_for_its_own_run_and_cannot_wait_for_anothers(tmp_path):
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_ok.py").write_text("def test_ok():\n    assert True\n")
    (suite / "test_bad.py").write_text(  # a log long enough to be stored in the artifacts store
        "def test_bad():\n    print('the start of the log', 'y' * 20000)\n    assert 1 == 2, 'one is not two'\n")
    with dtf_up(tmp_path) as up:
        url, env = up.url, up.env

        def cli(*args: str, creds: str | None = None) -> subprocess.CompletedProcess:
            extra = {"DTF_CREDS": creds} if creds else {}
            return subprocess.run([sys.executable, "-m", "dtf", *args, *(("--nats", url) if creds else ())],
                                  check=False, capture_output=True, text=True, env={**env, **extra}, timeout=180,
                                  cwd=tmp_path)

        for name in ("ann", "bob"):
            added = cli("creds", "add", "--role", "submitter", "--name", name, "--out", str(tmp_path / f"{name}.creds"))
            assert added.returncode == 0, added.stderr
        assert auth.read_credentials(tmp_path / "bob.creds").role == "submitter"
        ann, bob = str(tmp_path / "ann.creds"), str(tmp_path / "bob.creds")
        for _ in range(100):  # the server reloads its users asynchronously
            if cli("tasks", "--json", creds=bob).returncode == 0:
                break

        junit = tmp_path / "j.xml"
        submitted = cli("submit", str(suite), "--wait", "--junit", str(junit), "--run-id", "run-ann", creds=ann)
        assert submitted.returncode == 1, submitted.stderr
        assert "permissions violation" not in submitted.stderr
        assert "one is not two" in junit.read_text() and "test_bad" in junit.read_text()

        waited = cli("wait", "run-ann", "--json", creds=ann)
        assert waited.returncode == 1, waited.stderr
        report = json.loads(waited.stdout)
        assert sorted(t["state"] for t in report["tasks"]) == ["failed", "passed"], report

        reported = cli("report", "--run", "run-ann", "--format", "junit", creds=ann)
        assert reported.returncode == 0 and "one is not two" in reported.stdout, reported.stderr

        failed_task = next(t["task_id"] for t in report["tasks"] if t["state"] == "failed")
        logged = cli("logs", failed_task, creds=ann)
        assert logged.returncode == 0, logged.stderr
        assert "the start of the log" in logged.stdout and "one is not two" in logged.stdout

        foreign = cli("wait", "run-ann", "--json", creds=bob)
        assert foreign.returncode == 3, foreign.stderr
        assert "run run-ann is another submitter's" in foreign.stderr and foreign.stdout == ""
        foreign_log = cli("logs", failed_task, creds=bob)
        assert foreign_log.returncode == 3 and "the start of the log" not in foreign_log.stdout

        long = cli("submit", "--command", "sleep 600", "--run-id", "run-long", creds=ann)
        assert long.returncode == 0, long.stderr
        assert cli("cancel", "--run", "run-long", creds=bob).returncode == 3
        cancelled = cli("cancel", "--run", "run-long", creds=ann)
        assert cancelled.returncode == 0, cancelled.stderr
        assert cli("wait", "run-long", creds=ann).returncode == 1


async def test_the_server_lets_a_submitter_read_only_its_own_feed(secured_server):
    admin = await secured_server.connect(secured_server.admin)
    await topology.provision(admin.jetstream())
    subject = "dtf.task.run-a.run-a-1.submitted.alice"
    await admin.jetstream().publish(feed.feed_subject("alice", subject), b"{}", headers={"Nats-Msg-Id": "7"})
    refusals: list[str] = []

    async def on_error(exc: Exception) -> None:
        refusals.append(str(exc))

    bob = await secured_server.connect(secured_server.creds("submitter", "bob"), error_cb=on_error)
    alice = await secured_server.connect(secured_server.creds("submitter", "alice"))
    try:
        mine = [m async for m in feed.read(alice.jetstream(), "dtf.task.run-a.>", "alice")]
        assert [(m.stream, m.subject, m.seq) for m in mine] == [(topology.EVENTS, subject, 7)]
        assert [m async for m in feed.read(bob.jetstream(), "dtf.task.run-a.>", "bob")] == []
        create = f"$JS.API.CONSUMER.CREATE.{topology.FEED}"
        alices = "dtf.feed.alice.>"

        def body(**config) -> bytes:
            return json.dumps({"stream_name": topology.FEED, "config": {"deliver_subject": "_INBOX.x", **config}}).encode()

        own_name = reader.pool(reader.FEED_READER, reader.user_key(bob))[0]
        alices_name = reader.pool(reader.FEED_READER, reader.user_key(alice))[0]
        # another's prefix, by the filtered form or in the body of the bare form; its own prefix under a
        # name outside its pool (another's, or any other): refused by the server
        for api in (f"{create}.{own_name}.{alices}", create, f"{create}.{alices_name}.dtf.feed.bob.>",
                    f"{create}.x.dtf.feed.bob.>"):
            with pytest.raises((NatsTimeoutError, NoRespondersError)):
                await bob.request(api, body(filter_subject=alices), timeout=2)
        # its own prefix in the subject and another's (or none) in the body: the server checks one against the other
        for config in ({"filter_subject": alices}, {"filter_subjects": [alices]}, {}):
            reply = await bob.request(f"{create}.{own_name}.dtf.feed.bob.>", body(name=own_name, **config), timeout=2)
            assert "error" in json.loads(reply.data), config
        assert refusals
    finally:
        for nc in (admin, bob, alice):
            await nc.close()


def test_the_projector_hands_a_stored_log_only_to_the_submitter_of_its_task():
    from dtf.projections import logs
    from dtf.projections.projection import Projection

    projection = Projection.open(":memory:")
    con = projection.con
    con.execute("INSERT INTO tasks (task_id, run_id, submitter) VALUES ('t1', 'r1', 'ann')")
    con.execute("INSERT INTO attempts (task_id, attempt, run_id, worker_id, log_ref) VALUES"
                " ('t1', 1, 'r1', 'w1', 'logs/t1/1'), ('t1', 2, 'r1', 'w2', 'logs/t1/2'), ('t1', 3, 'r1', 'w1', NULL)")
    assert logs.log_ref(con, "t1", "ann") == ("w2", "logs/t1/2")  # in the bucket of the attempt's worker
    assert logs.log_ref(con, "t1", "bob") is None
    assert logs.page(b"x" * (logs.CHUNK + 1), 0)["next_offset"] == logs.CHUNK
    assert logs.page(b"x" * (logs.CHUNK + 1), logs.CHUNK) == {"data": "eA==", "next_offset": None}


def test_a_submission_into_anothers_run_and_its_rejection_reach_its_sender_not_the_runs_owner():
    from datetime import UTC, datetime

    from dtf import events as ev

    owners = {"run-a": "alice"}
    into_alices = "dtf.task.run-a.run-a-9.submitted.bob"
    rejection = ev.TaskRejected(id="rejected-9", time=datetime.now(UTC), run_id="run-a", task_id="run-a-9",
                                reason="run run-a belongs to submitter alice", source_subject=into_alices, source_seq=9)
    assert feed.reader_of(into_alices, None, owners) == "bob"
    assert feed.reader_of("dtf.task.run-a.run-a-9.rejected.coordinator", rejection, owners) == "bob"
    assert feed.reader_of("dtf.task.run-a.run-a-1.started.w1", None, owners) == "alice"
    assert feed.reader_of("dtf.task.run-b.run-b-1.started.w1", None, owners) is None  # no owner known: not fed
