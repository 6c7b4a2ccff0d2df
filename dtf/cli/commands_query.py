"""Reading commands: `dtf tasks`, `dtf workers` (asked of the projector, which owns the DuckDB read
model; `dtf results` is in commands_results), `dtf replay` (straight from the event log) and `dtf schema`."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime
from collections.abc import AsyncIterator
from pathlib import Path

import click
import msgspec
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from rich.console import Console
from rich.table import Table

from dtf import events as ev
from dtf import subjects, wire
from dtf.cli.common import EXIT_PERMISSION, CliError, connected, nats_options, query_scope
from dtf.limits import clip
from dtf.replay import Cutoff
from dtf.state import Fold
from dtf.streams import bus, topology

QUERY_TIMEOUT_S = 10.0
PROJECTOR_START_S = 5.0
"""How long a query waits for a projector that is still starting (just after `dtf up`)."""
COLUMNS = {
    "tasks": ["task_id", "run_id", "type", "name", "state", "worker_id", "attempts", "duration_s", "tests"],
    "workers": ["worker_id", "host", "pid", "state", "concurrency", "capabilities", "last_heartbeat"],
}


async def pages(nc, name: str, request: dict) -> AsyncIterator[dict]:
    """Each reply of one read-model query, following the projector's pages (`next_offset`)."""
    offset: int | None = 0
    deadline = asyncio.get_running_loop().time() + PROJECTOR_START_S
    while offset is not None:
        try:
            reply = await nc.request(subjects.query(name, query_scope(nc)),
                                     json.dumps({**request, "offset": offset}).encode(), timeout=QUERY_TIMEOUT_S)
        except NoRespondersError:
            if asyncio.get_running_loop().time() < deadline:
                await asyncio.sleep(0.2)
                continue
            raise CliError(f"no projector answered the {name} query (is `dtf up` or `dtf projector` "
                           "running?)") from None
        except NatsTimeout:
            raise CliError("the projector did not answer in time") from None
        try:
            body = wire.decode(reply.data)
        except wire.WireError as exc:
            raise CliError(f"the projector's reply is not JSON: {exc}") from None
        if not isinstance(body, dict):
            raise CliError("the projector's reply is not a JSON object")
        if "error" in body:
            if body.get("refused") is True:  # a submitter asked for what is not its own
                raise CliError(f"refused: {body['error']}", EXIT_PERMISSION)
            raise CliError(f"projector: {body['error']}")
        yield body
        offset = body.get("next_offset")


async def ask(nc, name: str, request: dict) -> list[dict]:
    """All rows of one read-model query."""
    return [row async for body in pages(nc, name, request) for row in body.get(name, [])]


async def refuse_foreign_run(nc, run_id: str) -> None:
    """For a submitter whose feed holds no run `run_id`: exit 3 when the read model holds it as
    another submitter's (the projector refuses to answer for it); return when it is just unknown."""
    await _refuse_foreign(nc, "tasks", {"run_id": run_id, "limit": 1})


async def refuse_foreign_task(nc, task_id: str) -> None:
    """`refuse_foreign_run` for a task."""
    await _refuse_foreign(nc, "results", {"task_id": task_id, "limit": 1})


async def _refuse_foreign(nc, name: str, request: dict) -> None:
    if query_scope(nc) is None:
        return
    async with contextlib.aclosing(pages(nc, name, request)) as replies:
        async for _ in replies:
            return


def query(name: str, request: dict, nats_url: str | None, creds: str | None) -> list[dict]:
    """A CLI command's one read-model query: connect, ask (every page), disconnect."""
    async def main() -> list[dict]:
        async with connected(nats_url, creds, f"dtf-{name}") as nc:
            return await ask(nc, name, request)

    return asyncio.run(main())


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2f}"
    if isinstance(value, dict):
        return " ".join(f"{k}={v}" for k, v in value.items() if v not in (None, [], {}, ""))
    return str(value)


def query_command(name: str, doc: str, with_run: bool) -> click.Command:
    """`dtf tasks|workers`: one shape, so one factory."""

    @nats_options
    @click.option("--json", "as_json", is_flag=True, help=f'Print {{"{name}": [...]}} on stdout.')
    def command(as_json: bool, nats_url: str | None, creds: str | None, run_id: str | None = None) -> None:
        rows = query(name, {"run_id": run_id} if run_id else {}, nats_url, creds)
        if as_json:
            click.echo(json.dumps({name: rows}))
            return
        table = Table(title=name)
        for column in COLUMNS[name]:
            table.add_column(column)
        for row in rows:
            table.add_row(*(cell(row.get(column)) for column in COLUMNS[name]))
        Console().print(table)

    command.__doc__ = doc
    if with_run:
        command = click.option("--run", "run_id", metavar="RUN_ID", help="Only this run.")(command)
    return click.command(name)(command)


tasks = query_command("tasks", "List tasks and their states (from the read model).", with_run=True)
workers = query_command("workers", "List workers, their capabilities and last heartbeats.", with_run=False)


def parse_time(value: str) -> datetime:
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not an ISO-8601 time", param_hint="--until") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def replay_line(msg: bus.StoredMsg, refused: str | None = None) -> dict:
    """One stored message as the JSON object `dtf replay --json` prints; `refused` is why the fold
    did not accept it (an event it refused keeps its body and gets the reason as "skipped")."""
    try:
        event = ev.decode(msg.data)
    except ev.DecodeError as exc:
        body = {"type": "Invalid", "reason": str(exc), "raw": msg.data[:4096].decode("utf-8", "replace")}
        return {"stream": msg.stream, "seq": msg.seq, "subject": msg.subject, "time": None, "event": body,
                "skipped": str(exc)}
    body = msgspec.to_builtins(event)
    line = {"stream": msg.stream, "seq": msg.seq, "subject": msg.subject, "time": body["time"], "event": body}
    return {**line, "skipped": refused} if refused else line


def human_line(line: dict) -> str:
    event = line["event"]
    detail = {k: v for k, v in event.items()
              if k in ("worker_id", "attempt", "outcome", "reason", "submitter", "deadline", "status")}
    text = (f"{line['seq']:>7} {line['time'] or '-':<32} {event['type']:<17} "
            f"{event.get('task_id', event.get('worker_id', ''))} {cell(detail)}")
    return f"{text} [skipped: {line['skipped']}]" if line.get("skipped") and event["type"] != "Invalid" else text


@click.command()
@click.option("--task", "task_id", metavar="ID", help="Only this task's events.")
@click.option("--until", "until", metavar="TIME", help="Stop at the first event after this ISO-8601 time.")
@click.option("--upto-seq", type=click.IntRange(min=1), metavar="N", help="Stop after stream sequence N.")
@click.option("--db", "db_path", type=click.Path(dir_okay=False, path_type=Path),
              help="Rebuild a read model in this (new) DuckDB file as of that point.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object a line.")
@nats_options
def replay(task_id: str | None, until: str | None, upto_seq: int | None, db_path: Path | None, as_json: bool,
           nats_url: str | None, creds: str | None) -> None:
    """Print the event log in stream order, or rebuild a read model from it (--db)."""
    if until and upto_seq:
        raise click.UsageError("give --until or --upto-seq, not both")
    if task_id is not None and not subjects.is_token(task_id):
        raise click.BadParameter("not a task id", param_hint="--task")
    until_time = parse_time(until) if until else None
    if db_path is not None and db_path.exists():
        raise CliError(f"{db_path} exists: --db rebuilds into a new file")
    asyncio.run(_replay(task_id, until_time, upto_seq, db_path, as_json, nats_url, creds))


async def _replay(task_id, until_time, upto_seq, db_path, as_json, nats_url, creds) -> None:
    async with connected(nats_url, creds, "dtf-replay") as nc:
        js = nc.jetstream()
        if db_path is not None:
            from dtf.projections.rebuild import rebuild

            counts = await rebuild(js, db_path, upto_seq=upto_seq, until=until_time)
            click.echo(json.dumps({"db": str(db_path), **counts}) if as_json else f"rebuilt {db_path}: {counts}")
            return
        filters = [subjects.task_any_run(task_id)] if task_id else [subjects.TASKS, subjects.WORKERS]
        cutoff = Cutoff(upto_seq, until_time)
        # The whole log is folded as the coordinator folds it, so what it refused is marked; one
        # task's messages alone are too little to judge admission, so only undecodable ones are.
        fold = Fold() if task_id is None else None
        shown, skipped = 0, []
        async with contextlib.aclosing(bus.read(js, topology.EVENTS, filters)) as messages:
            async for msg in messages:  # (closed before the connection drains, which would wait for it)
                if cutoff.ends_before(msg.seq, msg.data):
                    break
                refused = fold.apply(msg.subject, msg.seq, msg.data).invalid_reason if fold else None
                line = replay_line(msg, refused)
                shown += 1
                if line.get("skipped"):
                    skipped.append(f"seq {msg.seq}: {line['skipped']}")
                click.echo(json.dumps(line) if as_json else human_line(line))
        click.echo(f"dtf replay: {shown} messages, {len(skipped)} skipped"
                   + (f" ({'; '.join(clip(s, 200) for s in skipped[:10])}{'; ...' if len(skipped) > 10 else ''})"
                      if skipped else ""), err=True)


@click.command()
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              help="Write one <Event>.json schema per event type here (default: print them all).")
def schema(out_dir: Path | None) -> None:
    """The JSON Schemas of every event (committed under streams/schemas/)."""
    from dtf.streams import schemas

    if out_dir is None:
        click.echo(json.dumps(schemas.all_schemas(), indent=2, sort_keys=True))
        return
    for path in schemas.export(out_dir):
        click.echo(str(path))


COMMANDS = [tasks, workers, replay, schema]
