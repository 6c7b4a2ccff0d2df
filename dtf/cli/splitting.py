"""`dtf submit PATHS --split auto|N`: collect the suite once, ask the read model how long each test
took, and pack the node ids into shards (`dtf.split`) sized for the capable workers.

Collection runs here, at submit, once: `python -m pytest --collect-only -q --rootdir ROOT` in the
submitted root, in a thread (never on the event loop). The submitter can run the suite locally (it
is their checkout and environment) and a collection error then stops the submission with pytest's
own words instead of failing every shard on the workers. `--rootdir ROOT` makes the node ids
relative to the shipped root, so each is a path a worker can run from its workspace.

A shipped suite's node ids are cached (~/.cache/dtf/collections, or $XDG_CACHE_HOME/dtf/...) by
what decides them: the workspace's content hash, the arguments, the interpreter and the versions of
every package installed in it. Submitting the same tree again skips the collection, which for a big
suite costs as much as its longest shard (networkx: 11 s of a 70 s run).
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from dtf import split, subjects
from dtf.cli.common import CliError, query_scope
from dtf.schedule import capable
from dtf.spec import Requirements, TaskSpec, test_args
from dtf.state import Fold
from dtf.streams import bus, topology

COLLECT_TIMEOUT_S = 600.0


def parse_split(value: str) -> int | None:
    """`auto` (None: as many slots as the capable workers offer) or a number of parallel slots."""
    if value == "auto":
        return None
    try:
        slots = int(value)
    except ValueError:
        slots = 0
    if slots < 1:
        raise click.BadParameter(f"{value!r}: give auto or a number of parallel workers (1 or more)",
                                 param_hint="--split")
    return slots


def relative_args(paths: list[str], root: Path) -> list[str]:
    """Test paths and node ids as pytest arguments from the root."""
    rel = []
    for arg in paths:
        path_part, sep, rest = arg.partition("::")
        rel.append(str(Path(path_part).resolve().relative_to(root)) + sep + rest)
    return rel


def parse_collection(output: str) -> list[str]:
    """The node ids `pytest --collect-only -q` printed: its lines up to the first blank one (an item
    of a non-Python plugin may be a bare path)."""
    nodeids = []
    for line in output.splitlines():
        if not line.strip():
            break
        nodeids.append(line.strip())
    return nodeids


def collect(root: Path, args: list[str], pytest_args: list[str], python: str = sys.executable) -> list[str]:
    """The suite's node ids, relative to `root` (blocking: call it in a thread)."""
    argv = [python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "--rootdir", str(root),
            *args, *pytest_args]
    try:
        done = subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=COLLECT_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CliError(f"cannot collect the tests to split them: {exc}") from None
    if done.returncode == 5:
        raise CliError(f"pytest collected no tests under {' '.join(args)}")
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise CliError("collecting the tests to split them failed (pytest exit code "
                       f"{done.returncode}):\n" + "\n".join(tail))
    return parse_collection(done.stdout)


def collections_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dtf" / "collections"


def collection_key(workspace_sha: str, args: list[str], pytest_args: list[str], python: str) -> str:
    """What decides a collection's node ids besides the files: arguments, interpreter, installed
    packages (a plugin or a dependency upgrade can change parametrization). Only the running
    interpreter's packages can be listed, so another `python` is never cached."""
    installed = sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())
    blob = json.dumps([workspace_sha, args, pytest_args, python, sys.version, installed])
    return hashlib.sha256(blob.encode()).hexdigest()


def cached_collect(root: Path, args: list[str], pytest_args: list[str], workspace_sha: str | None,
                   python: str = sys.executable) -> tuple[list[str], bool]:
    """`collect`, answered from the cache when the same workspace was collected the same way before;
    whether it was. Blocking: call it in a thread."""
    if workspace_sha is None or python != sys.executable:
        return collect(root, args, pytest_args, python), False
    path = collections_dir() / f"{collection_key(workspace_sha, args, pytest_args, python)}.json"
    try:
        nodeids = msgspec.json.decode(path.read_bytes(), type=list[str])
        if nodeids:
            return nodeids, True
    except (OSError, msgspec.DecodeError):
        pass  # not cached yet, or a damaged entry: collect again
    nodeids = collect(root, args, pytest_args, python)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        scratch = path.with_suffix(f".{os.getpid()}.tmp")
        scratch.write_bytes(msgspec.json.encode(nodeids))
        scratch.replace(path)  # atomic: a concurrent submit reads the old entry or the new one
    except OSError:
        pass  # a read-only home: collect every time
    return nodeids, False


async def capable_slots(js: JetStreamContext, requirements: Requirements) -> int:
    """Slots of the online, not draining workers that could run the shards (from the event log)."""
    fold = Fold()
    async for msg in bus.read(js, topology.EVENTS, [subjects.worker("*", "*")]):
        fold.apply(msg.subject, msg.seq, msg.data)
    return sum(w.concurrency for w in fold.workers.values()
               if w.status == "online" and not w.draining and capable(w, requirements))


async def history(nc: Client, files: list[str], project: str) -> dict[str, float]:
    """Recorded durations by node id; empty (with a note) when no projector answers."""
    from dtf.cli.commands_query import ask

    try:
        rows = await ask(nc, "durations", {"files": files, "project": project})
    except CliError as exc:
        click.echo(f"dtf: no test history ({exc.format_message()}); splitting by estimates alone", err=True)
        return {}
    return {row["nodeid"]: row["duration_s"] for row in rows}


@dataclass(frozen=True)
class Request:
    """What `--split`, `--group` and `--cold` asked for; `slots` None is auto."""

    slots: int | None
    group: split.Group
    warm: bool = True


async def plan_shards(nc: Client, js: JetStreamContext, request: Request, base: TaskSpec, root: Path,
                      paths: list[str], project: str,
                      workspace_sha: str | None = None) -> tuple[TaskSpec, list[list[str]]]:
    """The base spec marked as a split shard (`config.split`: the whole suite's arguments, which a warm
    pytest process collects once, and whether to use one) and the shards, biggest first."""
    if request.slots is None and query_scope(nc) is not None:
        raise CliError("--split auto sizes the split by the workers in the event log, which submitter "
                       "credentials cannot read; give --split N")
    args = relative_args(paths, root)
    nodeids, cached = await asyncio.to_thread(cached_collect, root, args, test_args(base), workspace_sha)
    if not nodeids:
        raise CliError(f"pytest listed no node ids under {' '.join(args)}")
    slots = request.slots
    if slots is None:
        slots = await capable_slots(js, base.requirements)
        if slots == 0:
            click.echo("dtf: no capable worker is online to size the split for; planning for 1 "
                       "(give --split N to plan for N)", err=True)
            slots = 1
    known = await history(nc, sorted({split.file_of(n) for n in nodeids}), project)
    planned = split.plan(nodeids, known, slots, group=request.group)
    matched = len(split.match_history(nodeids, known))
    click.echo(f"dtf: split {len(nodeids)} tests into {len(planned)} shards for {slots} slots "
               f"({matched} with history, ~{sum(s.estimate_s for s in planned):.1f}s estimated"
               f"{'; collection cached' if cached else ''})", err=True)
    config = {**base.config, "split": {"suite": args, "warm": request.warm}}
    marked = msgspec.structs.replace(base, config=config)
    return marked, [list(s.nodeids) for s in planned]
