"""Hostile input against a real nats-server, a coordinator, a worker and the projector: each attack
(a 1 MiB submission, 10,000-deep and 100 KB-of-brackets messages, a time without an offset, a task
in another submitter's run, a reused task id) fails alone, on the record with its reason, while the
work around it is assigned, run and projected; `dtf replay` reads the whole stream and says what it
skipped, and `dtf submit` refuses what admission would refuse, with exit 2."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from test_projection_live import caught_up, projector
from test_worker_agent import running_agent

from dtf import events as ev
from dtf import subjects
from dtf.cli import submit as sub
from dtf.cli.coordinator import Coordinator
from dtf.limits import MAX_SUBMISSION_BYTES, RAW_KEEP
from dtf.projections.projection import Projection
from dtf.projections.rebuild import rebuild, tables_equal
from dtf.spec import TaskSpec
from dtf.streams import bus, topology

SAFETY_S = 60.0
"""Only a guard against hanging forever; nothing here asserts on time."""


def good(task_id: str, who: str = "alice", run_id: str = "r1", command: str = "true") -> ev.TaskSubmitted:
    return ev.TaskSubmitted(id=f"submit-{task_id}-{who}-{command}", run_id=run_id, task_id=task_id, submitter=who,
                            spec=TaskSpec(type="command", config={"command": command}))


def sized(task_id: str, size: int) -> bytes:
    """A well-formed submission of exactly `size` bytes."""
    raw = msgspec.json.decode(ev.encode(good(task_id)))
    raw["spec"]["config"]["blob"] = ""
    raw["spec"]["config"]["blob"] = "x" * (size - len(msgspec.json.encode(raw)))
    data = msgspec.json.encode(raw)
    assert len(data) == size
    return data


def deep_submission(task_id: str) -> bytes:
    text = ev.encode(good(task_id)).decode()
    return text.replace('"command":"true"', '"command":"true","deep":' + "[" * 10_000 + "]" * 10_000).encode()


def naive_submission(task_id: str) -> bytes:
    raw = msgspec.json.decode(ev.encode(good(task_id)))
    raw["time"] = "2026-01-01T00:00:00"  # no offset
    return msgspec.json.encode(raw)


# subject -> (bytes, how the rejection's reason starts); None: not a submission, only set aside
ATTACKS = {
    "dtf.task.r1.big.submitted.alice": (sized("big", 1_048_470), f"submission is 1048470 bytes; the limit is {MAX_SUBMISSION_BYTES}"),
    "dtf.task.r1.deep.submitted.alice": (deep_submission("deep"), "not an event object: nested more than 64 levels deep"),
    "dtf.task.r1.brackets.submitted.alice": (b"[" * 100_000, "not an event object: nested more than 64 levels deep"),
    "dtf.task.r1.naive.submitted.alice": (naive_submission("naive"), "invalid TaskSubmitted"),
    "dtf.task.r1.r1-bob.submitted.bob": (ev.encode(good("r1-bob", "bob")), "run r1 belongs to submitter alice"),
    "dtf.task.r1.a.submitted.alice": (ev.encode(good("a", command="false")), "task id a is already submitted in run r1"),
    "dtf.task.r1.garbage.submitted.mallory": (b"{not json", "not an event object"),
    "dtf.task.r1.a.result.w1": (b"[" * 100_000, None),
}


async def events_of(js) -> list[tuple[str, int, ev.Event | None]]:
    out = []
    async for msg in bus.read(js, topology.EVENTS, [subjects.TASKS, subjects.WORKERS]):
        try:
            out.append((msg.subject, msg.seq, ev.decode(msg.data)))
        except ev.DecodeError:
            out.append((msg.subject, msg.seq, None))
    return out


async def until(check) -> None:
    async def poll():
        while not await check():
            await asyncio.sleep(0.1)
    await asyncio.wait_for(poll(), SAFETY_S)


async def test_each_attack_fails_alone_and_the_work_around_it_is_run_and_projected(nats_server, nc, js, tmp_path):
    live = tmp_path / "live.duckdb"
    stop = asyncio.Event()
    coordinator = Coordinator(nc, "c1")
    async with projector(nc, live):
        async with running_agent(nats_server, js, tmp_path, concurrency=2):
            deciding = asyncio.create_task(coordinator.run(stop))
            await bus.publish(js, good("a"))
            seqs = {}
            for subject, (data, _) in ATTACKS.items():
                seqs[subject] = (await js.publish(subject, data)).seq
            await bus.publish(js, good("b"))

            async def settled() -> bool:
                stored = [e for _, _, e in await events_of(js)]
                results = {e.task_id for e in stored if isinstance(e, ev.ResultReported) and e.outcome == "passed"}
                return results >= {"a", "b"} and sum(isinstance(e, ev.TaskRejected) for e in stored) == 7

            await until(settled)
            stop.set()
            await deciding
        await caught_up(nc, js)  # the worker has left: nothing moves any more
    assert nc.is_connected and coordinator.published >= 9  # 2 assignments, 7 rejections

    stored = await events_of(js)
    assigned = sorted(e.task_id for _, _, e in stored if isinstance(e, ev.TaskAssigned))
    assert assigned == ["a", "b"]
    rejections = {e.source_subject: e for _, _, e in stored if isinstance(e, ev.TaskRejected)}
    for subject, (_, reason) in ATTACKS.items():
        if reason is None:
            assert subject not in rejections
            continue
        assert rejections[subject].reason.startswith(reason), rejections[subject].reason
        assert rejections[subject].source_seq == seqs[subject]
        assert len(rejections[subject].raw.encode()) <= 3 * RAW_KEEP  # U+FFFD for each undecodable byte at most

    with Projection.open(live) as projection:
        tasks = dict(projection.con.execute("SELECT task_id, status FROM tasks").fetchall())
        invalid = dict(projection.con.execute("SELECT seq, reason FROM invalid_events").fetchall())
    # alice's own broken submissions are rejected tasks of her run; bob's and mallory's are none of it
    assert tasks == {"a": "passed", "b": "passed", "big": "rejected", "deep": "rejected", "brackets": "rejected",
                     "naive": "rejected"}
    assert set(invalid) == set(seqs.values()) and all(invalid.values())
    assert invalid[seqs["dtf.task.r1.a.result.w1"]] == "not an event object: nested more than 64 levels deep"

    await rebuild(js, tmp_path / "rebuilt.duckdb")
    assert tables_equal(live, tmp_path / "rebuilt.duckdb") == []

    replayed = await asyncio.to_thread(dtf, nats_server.url, "replay", "--json", "--until", "2100-01-01T00:00:00Z",
                                       cwd=tmp_path)
    assert replayed.returncode == 0, replayed.stderr
    lines = [json.loads(line) for line in replayed.stdout.splitlines()]
    assert len(lines) == len(stored)
    assert {line["seq"] for line in lines if line.get("skipped")} == set(seqs.values())
    assert f"{len(seqs)} skipped" in replayed.stderr

    waited = await asyncio.to_thread(dtf, nats_server.url, "wait", "r1", "--json", cwd=tmp_path)
    report = json.loads(waited.stdout)
    assert sorted(t["task_id"] for t in report["tasks"]) == ["a", "b", "big", "brackets", "deep", "naive"]


def dtf(url: str, *args: str, cwd: Path, user: str = "alice") -> subprocess.CompletedProcess:
    """A dtf command as `user`, run in (and keeping its state under) the test's `cwd`."""
    env = {**os.environ, "USER": user, "LOGNAME": user, "XDG_STATE_HOME": str(cwd / ".state")}
    env.pop("DTF_NATS_URL", None)
    env.pop("DTF_CREDS", None)
    return subprocess.run([sys.executable, "-m", "dtf", *args, "--nats", url], capture_output=True, text=True,
                          env=env, timeout=120, cwd=cwd)


async def test_dtf_submit_refuses_an_oversize_spec_and_anothers_run_and_adds_new_ids_to_its_own(
        nats_server, js, tmp_path):
    spec = tmp_path / "big.json"
    spec.write_text(json.dumps({"type": "command", "config": {"command": "true", "blob": "x" * MAX_SUBMISSION_BYTES}}))
    refused = await asyncio.to_thread(dtf, nats_server.url, "submit", "--spec", str(spec), cwd=tmp_path)
    assert refused.returncode == 2
    assert "bytes; the limit is 262144" in refused.stderr and "\n" not in refused.stderr.strip()
    assert (await js.stream_info(topology.EVENTS)).state.last_seq == 0  # nothing was published

    first = await asyncio.to_thread(dtf, nats_server.url, "submit", "--run-id", "shared", "--command", "true",
                                    "--json", cwd=tmp_path)
    again = await asyncio.to_thread(dtf, nats_server.url, "submit", "--run-id", "shared", "--command", "true",
                                    "--json", cwd=tmp_path)
    assert (first.returncode, again.returncode) == (0, 0), (first.stderr, again.stderr)
    assert [json.loads(first.stdout)["tasks"], json.loads(again.stdout)["tasks"]] == [["shared-1"], ["shared-2"]]

    foreign = await asyncio.to_thread(dtf, nats_server.url, "submit", "--run-id", "shared", "--command", "true",
                                      user="bob", cwd=tmp_path)
    assert foreign.returncode == 2 and "run shared belongs to submitter alice" in foreign.stderr
    submitters = {e.submitter for _, _, e in await events_of(js) if isinstance(e, ev.TaskSubmitted)}
    assert submitters == {"alice"}


async def test_a_dropped_duplicate_or_a_refused_submission_is_reported_not_silently_lost(js):
    """What `dtf submit` checks after publishing: the acks' duplicate flags, and the run's log as
    every reader folds it (two submitters racing for one run, one task id)."""
    ours = sub.submissions("race", [TaskSpec(type="command", config={"command": "true"})], "alice", "")
    theirs = sub.submissions("race", [TaskSpec(type="command", config={"command": "other"})], "bob", "")
    assert ours[0].id != theirs[0].id  # ids follow the content: the stream cannot drop one for the other
    stored = await bus.publish_many(js, theirs)
    acks = await bus.publish_many(js, ours)
    log = [(m.subject, m.seq, m.data) async for m in bus.read(js, topology.EVENTS, [subjects.run_all("race")])]
    assert sub.refusals(log, ours, acks) == ["task race-1: run race belongs to submitter bob"]
    again = await bus.publish_many(js, theirs)
    assert again[0].duplicate
    [problem] = sub.refusals(log, theirs, again)
    assert problem.startswith("task race-1: the stream already holds this very submission")
    assert sub.refusals(log, theirs, stored) == []
