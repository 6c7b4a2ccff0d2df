"""Issue #13's attacks, each against one real `dtf up` (auth on, uid isolation on: this suite runs as
root) with real submitter credentials from `dtf creds add`: each attack fails on the record with its
reason, and the work around it still runs to its verdict. Attacks covered elsewhere are listed in
docs/OPERATIONS.md ("Attacks and where they are tested")."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import msgspec
import psutil
import pytest
from dtf.streams import auth, bus, topology

from dtf import events as ev
from dtf import subjects
from dtf.limits import MAX_SUBMISSION_BYTES, NATS_MAX_PAYLOAD
from dtf.spec import TaskSpec
from auth_up import dtf_up

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="uid isolation needs a root worker")

SAFETY_S = 120.0
"""Only a guard against hanging forever; nothing here asserts on time."""


@dataclass
class System:
    url: str
    data: Path
    admin: Path
    ann: Path
    bob: Path
    cwd: Path
    env: dict

    def cli(self, *args: str, creds: Path | None = None) -> subprocess.CompletedProcess:
        where = () if args[0] == "creds" else ("--nats", self.url)  # `creds add` finds the system by its context
        return subprocess.run([sys.executable, "-m", "dtf", *args, *where], check=False,
                              capture_output=True, text=True, env={**self.env, "DTF_CREDS": str(creds or self.admin)},
                              timeout=180, cwd=self.cwd)

    async def connect(self, creds: Path):
        return await bus.connect(self.url, name="dtf-attacker", **auth.client_options(creds))

    async def log(self) -> list[tuple[str, int, ev.Event | None]]:
        nc = await self.connect(self.admin)
        try:
            out = []
            async for msg in bus.read(nc.jetstream(), topology.EVENTS, [subjects.TASKS]):
                try:
                    out.append((msg.subject, msg.seq, ev.decode(msg.data)))
                except ev.DecodeError:
                    out.append((msg.subject, msg.seq, None))
            return out
        finally:
            await nc.close()

    async def publish_raw(self, creds: Path, subject: str, data: bytes, msg_id: str | None = None):
        nc = await self.connect(creds)
        try:
            return await nc.jetstream().publish(subject, data, headers={"Nats-Msg-Id": msg_id} if msg_id else None)
        finally:
            await nc.close()

    async def rejection_of(self, seq: int) -> ev.TaskRejected:
        deadline = time.monotonic() + SAFETY_S
        while time.monotonic() < deadline:
            for _, _, event in await self.log():
                if isinstance(event, ev.TaskRejected) and event.source_seq == seq:
                    return event
            await asyncio.sleep(0.2)
        pytest.fail(f"no TaskRejected for seq {seq}")

    def services(self) -> list[psutil.Process]:
        return psutil.Process(self.up.pid).children()


@pytest.fixture(scope="module")
def system(tmp_path_factory):
    root = tmp_path_factory.mktemp("attacks")
    with dtf_up(root, "--isolate", "on") as up:
        system = System(up.url, root / "d", up.admin, root / "ann.creds", root / "bob.creds", root, up.env)
        system.up = up.process
        for name in ("ann", "bob"):
            added = system.cli("creds", "add", "--role", "submitter", "--name", name, "--out", str(root / f"{name}.creds"))
            assert added.returncode == 0, added.stderr
        for _ in range(100):  # the server reloads its users asynchronously
            if system.cli("tasks", "--json", creds=system.bob).returncode == 0:
                break
        yield system


def submission(task_id: str, who: str, run_id: str, command: str = "true", **config) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(id=f"submit-{task_id}-{command}", run_id=run_id, task_id=task_id, submitter=who,
                            spec=TaskSpec(type="command", config={"command": command, **config}))


def sized(event: ev.TaskSubmitted, size: int) -> bytes:
    """`event` encoded to exactly `size` bytes by a blob in its config."""
    raw = msgspec.json.decode(ev.encode(event))
    raw["spec"]["config"]["blob"] = ""
    raw["spec"]["config"]["blob"] = "x" * (size - len(msgspec.json.encode(raw)))
    data = msgspec.json.encode(raw)
    assert len(data) == size
    return data


def waited(system: System, run_id: str, creds: Path) -> dict:
    done = system.cli("wait", run_id, "--json", creds=creds)
    return {"code": done.returncode, "tasks": {t["task_id"]: t["state"] for t in json.loads(done.stdout)["tasks"]}}


async def test_a_task_in_another_submitters_run_is_rejected_and_that_runs_verdict_is_unchanged(system):
    own = await asyncio.to_thread(system.cli, "submit", "--command", "true", "--run-id", "run-ann", "--wait",
                                  creds=system.ann)
    assert own.returncode == 0, own.stderr
    raw = submission("run-ann-2", "bob", "run-ann", "false")
    ack = await system.publish_raw(system.bob, subjects.subject_for(raw), ev.encode(raw), raw.id)
    rejected = await system.rejection_of(ack.seq)
    assert rejected.reason == "run run-ann belongs to submitter ann"
    after = await asyncio.to_thread(waited, system, "run-ann", system.ann)
    assert after == {"code": 0, "tasks": {"run-ann-1": "passed"}}


async def test_dtf_submit_with_submitter_credentials_into_another_submitters_run_exits_with_the_reason(system):
    own = await asyncio.to_thread(system.cli, "submit", "--command", "true", "--run-id", "run-ann2", creds=system.ann)
    assert own.returncode == 0, own.stderr
    by_cli = await asyncio.to_thread(system.cli, "submit", "--command", "false", "--run-id", "run-ann2", "--wait",
                                     "--wait-timeout", "20", creds=system.bob)
    assert by_cli.returncode not in (0, 1) and "run-ann2" in by_cli.stderr, (by_cli.returncode, by_cli.stderr)


async def test_a_reused_task_id_is_rejected_and_a_resent_submission_is_reported_a_duplicate(system):
    first = await asyncio.to_thread(system.cli, "submit", "--command", "true", "--run-id", "run-re", "--wait",
                                    creds=system.ann)
    assert first.returncode == 0, first.stderr
    again = await asyncio.to_thread(system.cli, "submit", "--command", "true", "--run-id", "run-re", "--json",
                                    "--wait", creds=system.ann)
    assert again.returncode == 0, again.stderr  # the owner's second submission adds new task ids, drops nothing
    assert sorted(t["task_id"] for t in json.loads(again.stdout)["tasks"]) == ["run-re-1", "run-re-2"]
    reused = submission("run-re-1", "ann", "run-re", "echo other")
    ack = await system.publish_raw(system.ann, subjects.subject_for(reused), ev.encode(reused), reused.id)
    assert not ack.duplicate
    assert (await system.rejection_of(ack.seq)).reason.startswith("task id run-re-1 is already submitted in run run-re")
    resent = await system.publish_raw(system.ann, subjects.subject_for(reused), ev.encode(reused), reused.id)
    assert resent.duplicate and resent.seq == ack.seq  # the publisher is told: nothing new was stored


async def test_an_oversize_submission_is_rejected_for_size_and_scheduling_goes_on(system):
    big = submission("run-big-1", "ann", "run-big")
    ack = await system.publish_raw(system.ann, subjects.subject_for(big), sized(big, 1_048_470), big.id)
    rejected = await system.rejection_of(ack.seq)
    assert rejected.reason.startswith(f"submission is 1048470 bytes; the limit is {MAX_SUBMISSION_BYTES}")
    after = await asyncio.to_thread(system.cli, "submit", "--command", "true", "--wait", creds=system.ann)
    assert after.returncode == 0, after.stderr


async def test_a_spec_just_under_the_cap_is_assigned_and_run_and_its_assignment_fits_one_message(system):
    spec = system.cwd / "fits.json"
    probe = submission("run-fits-1", "ann", "run-fits")
    blob = json.loads(sized(probe, MAX_SUBMISSION_BYTES - 400))["spec"]["config"]["blob"]
    spec.write_text(json.dumps({"type": "command", "config": {"command": "true", "blob": blob}}))
    done = await asyncio.to_thread(system.cli, "submit", "--spec", str(spec), "--run-id", "run-fits", "--wait",
                                   creds=system.ann)
    assert done.returncode == 0, done.stderr
    nc = await system.connect(system.admin)
    try:
        assigned = [m async for m in bus.read(nc.jetstream(), topology.EVENTS, ["dtf.task.run-fits.*.assigned.*"])]
    finally:
        await nc.close()
    assert len(assigned) == 1 and MAX_SUBMISSION_BYTES - 1000 < len(assigned[0].data) < NATS_MAX_PAYLOAD


async def test_a_100_kb_nested_message_is_refused_by_every_reader_which_each_go_on(system):
    detector = [p for p in system.services() if "detector" in p.cmdline()]
    ack = await system.publish_raw(system.ann, "dtf.task.run-deep.run-deep-1.submitted.ann", b"[" * 100_000)
    rejected = await system.rejection_of(ack.seq)  # the coordinator
    assert rejected.reason == "not an event object: nested more than 64 levels deep"
    after = await asyncio.to_thread(system.cli, "submit", "--command", "true", "--wait", creds=system.ann)
    assert after.returncode == 0, after.stderr
    for _ in range(600):  # the projector records it as a rejected task of ann's run
        listed = await asyncio.to_thread(system.cli, "tasks", "--run", "run-deep", "--json")
        if listed.returncode == 0 and json.loads(listed.stdout)["tasks"]:
            break
    assert [t.get("status", t.get("state")) for t in json.loads(listed.stdout)["tasks"]] == ["rejected"]
    assert detector and all(p.is_running() for p in detector)  # the detector read past it too
    replayed = await asyncio.to_thread(system.cli, "replay", "--json")
    assert replayed.returncode == 0, replayed.stderr
    skipped = {line["seq"]: line for line in map(json.loads, replayed.stdout.splitlines()) if line.get("skipped")}
    assert ack.seq in skipped and "nested more than 64 levels deep" in json.dumps(skipped[ack.seq])


async def test_dtf_replay_of_the_whole_stream_skips_a_submission_without_a_time_offset(system):
    raw = msgspec.json.decode(ev.encode(submission("run-naive-1", "ann", "run-naive")))
    raw["time"] = "2026-01-01T00:00:00"
    ack = await system.publish_raw(system.ann, "dtf.task.run-naive.run-naive-1.submitted.ann", msgspec.json.encode(raw))
    assert (await system.rejection_of(ack.seq)).reason.startswith("invalid TaskSubmitted")
    replayed = await asyncio.to_thread(system.cli, "replay", "--json")
    assert replayed.returncode == 0, replayed.stderr
    lines = [json.loads(line) for line in replayed.stdout.splitlines()]
    skipped = {line["seq"]: line for line in lines if line.get("skipped")}
    assert ack.seq in skipped and "timezone" in skipped[ack.seq]["skipped"]
    assert any(line.get("seq", 0) > ack.seq for line in lines)  # the replay went on past it


async def test_a_command_task_finds_no_credential_in_its_parent_env_context_or_creds_files(system):
    context = json.loads((system.data / "context.json").read_text())
    secrets = [auth.read_credentials(p).seed for p in Path(context["auth_dir"]).rglob("*") if p.is_file()
               and p.suffix == ".creds"] + [auth.read_credentials(p).seed for p in (system.ann, system.bob)]
    assert secrets
    files = " ".join(str(p) for p in Path(context["auth_dir"]).rglob("*") if p.is_file())
    command = (f"cat /proc/$PPID/cmdline /proc/$PPID/environ; env; cat {system.data / 'context.json'} "
               f"{system.env['XDG_STATE_HOME']}/dtf/* {files} {system.admin}; true")
    done = await asyncio.to_thread(system.cli, "submit", "--command", command, "--run-id", "run-peek", "--wait",
                                   creds=system.ann)
    assert done.returncode == 0, done.stderr
    logged = await asyncio.to_thread(system.cli, "logs", "run-peek-1", creds=system.ann)
    assert logged.returncode == 0 and "Permission denied" in logged.stdout, logged.stderr
    assert not any(secret in logged.stdout for secret in secrets)
    assert "DTF_CREDS" not in logged.stdout


async def test_a_setsid_child_of_a_task_is_killed_when_its_attempt_ends(system):
    done = await asyncio.to_thread(system.cli, "submit", "--command", "setsid nohup sleep 300 >/dev/null 2>&1 & "
                                   "echo child=$!", "--run-id", "run-orphan", "--wait", creds=system.ann)
    assert done.returncode == 0, done.stderr
    logged = await asyncio.to_thread(system.cli, "logs", "run-orphan-1", creds=system.ann)
    pid = int(logged.stdout.split("child=")[1].split()[0])
    for _ in range(600):
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            break
        await asyncio.sleep(0.1)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
