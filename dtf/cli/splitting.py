"""`dtf submit PATHS --split auto|N`: collect the suite once (`collection`), ask the read model how
long each test took, and pack the node ids into shards (`dtf.split`) sized for the capable workers.

A tree not collected before (the collection cache is by content, so every commit of a CI run) whose
files mostly have recorded tests is split by whole files instead, without collecting it: pytest
lists the files (no test module imported), each is estimated from the tests it recorded, and the
shards name files. Only under `--group auto|file`, and only when no file is so long that it
should be cut (`split.plan_files`); otherwise the suite is collected as above."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import click
import msgspec
from nats.aio.client import Client
from nats.js import JetStreamContext

from dtf import split, subjects
from dtf.cli import collection
from dtf.cli.common import CliError, query_scope
from dtf.schedule import capable
from dtf.spec import Requirements, TaskSpec, test_args
from dtf.state import Fold, WorkerState
from dtf.streams import bus, topology


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


def capable_slots(workers: Iterable[WorkerState], requirements: Requirements) -> int:
    """Slots of the online, not draining workers that could run the shards."""
    return sum(w.concurrency for w in workers
               if w.status == "online" and not w.draining and capable(w, requirements))


async def fleet(nc: Client, js: JetStreamContext) -> list[WorkerState]:
    """The workers as the event log has them; for a submitter, who may not read the log, as the
    projector's `workers` query shows them (capabilities, state and slots are all a split needs)."""
    if query_scope(nc) is None:
        fold = Fold()
        async for msg in bus.read(js, topology.EVENTS, [subjects.worker("*", "*")]):
            fold.apply(msg.subject, msg.seq, msg.data)
        return list(fold.workers.values())
    from dtf.cli.commands_query import ask

    try:
        return [msgspec.convert({"worker_id": row["worker_id"], "status": row["state"], "draining": row["draining"],
                                 "concurrency": row["concurrency"] or 0, "capabilities": row["capabilities"]},
                                WorkerState) for row in await ask(nc, "workers", {})]
    except msgspec.ValidationError as exc:
        raise CliError(f"the projector's workers are not as expected: {exc}") from None


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
    args = relative_args(paths, root)
    pytest_args = test_args(base)
    slots = await _slots(nc, js, request, base)
    config = {**base.config, "split": {"suite": args, "warm": request.warm}}
    marked = msgspec.structs.replace(base, config=config)
    nodeids = await asyncio.to_thread(collection.cached, args, pytest_args, workspace_sha)
    was_cached = nodeids is not None
    files = known = None
    if not was_cached and request.group in ("auto", "file") and collection.whole_files(args, pytest_args):
        files = await asyncio.to_thread(collection.discover, root, args, pytest_args)
        if files:
            known = await history(nc, files, project)  # the same files the node ids would come from
            by_file = split.plan_files(files, known, slots, group=request.group)
            if by_file is not None:
                click.echo(f"dtf: split {len(files)} test files into {len(by_file)} shards for {slots} slots "
                           f"by the tests they recorded, without collecting them "
                           f"(~{sum(s.estimate_s for s in by_file):.1f}s estimated)", err=True)
                return marked, [list(s.nodeids) for s in by_file]
    if nodeids is None:
        nodeids, _ = await asyncio.to_thread(collection.cached_collect, root, args, pytest_args,
                                             workspace_sha, files=files)
    if not nodeids:
        raise CliError(f"pytest listed no node ids under {' '.join(args)}")
    if known is None:
        known = await history(nc, sorted({split.file_of(n) for n in nodeids}), project)
    planned = split.plan(nodeids, known, slots, group=request.group)
    matched = len(split.match_history(nodeids, known))
    click.echo(f"dtf: split {len(nodeids)} tests into {len(planned)} shards for {slots} slots "
               f"({matched} with history, ~{sum(s.estimate_s for s in planned):.1f}s estimated"
               f"{'; collection cached' if was_cached else ''})", err=True)
    return marked, [list(s.nodeids) for s in planned]


async def _slots(nc: Client, js: JetStreamContext, request: Request, base: TaskSpec) -> int:
    if request.slots is not None:
        return request.slots
    slots = capable_slots(await fleet(nc, js), base.requirements)
    if slots == 0:
        click.echo("dtf: no capable worker is online to size the split for; planning for 1 "
                   "(give --split N to plan for N)", err=True)
        slots = 1
    return slots
