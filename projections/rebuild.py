"""Rebuilding the read model from the streams, and comparing two read models.

`rebuild` reads DTF_EVENTS from its first message, then each worker's last heartbeat, into a fresh
database through the very `Projection` the live projector uses, so a rebuilt database equals the
live one table for table (`tables_equal`). It builds into `<path>.rebuild` and renames it into place
when done, so an interrupted rebuild leaves nothing half-built behind.

Point in time: `upto_seq` stops after that DTF_EVENTS sequence, `until` before the first event later
than that time. DTF_HEARTBEATS only keeps each worker's newest heartbeat, so a point-in-time rebuild
includes one only if it is not later than the cut-off (the last event's time for `upto_seq`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from datetime import datetime
from pathlib import Path

import duckdb
from nats.js import JetStreamContext

from dtf import subjects
from dtf.replay import Cutoff
from dtf.projections import artifacts, schema
from dtf.projections.projection import BatchResult, Projection
from dtf.streams import bus
from dtf.streams.topology import EVENTS, HEARTBEATS

BATCH = 2000


def _remove(path: Path) -> None:
    for candidate in (path, path.with_name(path.name + ".wal")):
        candidate.unlink(missing_ok=True)


def _check_unused(path: Path) -> None:
    """Refuse to replace a database another process (a running projector) has open."""
    try:
        duckdb.connect(str(path)).close()
    except duckdb.IOException as exc:
        raise FileExistsError(f"{path} is in use by another process: {exc}") from None


async def rebuild(
    js: JetStreamContext, db_path: str | Path, *, upto_seq: int | None = None,
    until: datetime | None = None, overwrite: bool = False, batch: int = BATCH,
) -> dict[str, int]:
    """Build the read model at `db_path` from the streams; returns what was read and applied.
    An existing file is only replaced with `overwrite=True` and when no process has it open."""
    path = Path(db_path)
    if path.exists():
        if not overwrite:
            raise FileExistsError(f"{path} exists; rebuild into a new file or pass overwrite=True")
        await asyncio.to_thread(_check_unused, path)
    building = path.with_name(path.name + ".rebuild")
    await asyncio.to_thread(_remove, building)
    cutoff = Cutoff(upto_seq, until)
    totals = BatchResult()
    read = {"events": 0, "heartbeats": 0}
    projection = await asyncio.to_thread(Projection.open, building)
    try:
        chunk: list[bus.StoredMsg] = []

        async def flush() -> None:
            if chunk:
                tests = await artifacts.fetch_tests(js, chunk)
                totals.add(await asyncio.to_thread(projection.apply_batch, list(chunk), tests))
                chunk.clear()

        reader = bus.read(js, EVENTS, [subjects.TASKS, subjects.WORKERS])
        async with contextlib.aclosing(reader) as messages:
            async for message in messages:
                if cutoff.ends_before(message.seq, message.data):
                    break
                chunk.append(message)
                read["events"] += 1
                if len(chunk) >= batch:
                    await flush()
        await flush()

        reader = bus.read(js, HEARTBEATS, [subjects.HEARTBEATS], last_per_subject=True)
        async with contextlib.aclosing(reader) as messages:
            async for message in messages:
                if not cutoff.heartbeat_counts(message.data):
                    continue
                chunk.append(message)
                read["heartbeats"] += 1
        await flush()
        await asyncio.to_thread(projection.flush)
        checkpoints = projection.checkpoints()
    finally:
        await asyncio.to_thread(projection.close)
    await asyncio.to_thread(_remove, path)  # a stale .wal beside the old file must not outlive it
    await asyncio.to_thread(os.replace, building, path)
    return {
        **read, **totals.as_dict(),
        "last_seq": checkpoints.get(EVENTS, 0), "heartbeats_last_seq": checkpoints.get(HEARTBEATS, 0),
    }


def _quote(path: str | Path) -> str:
    return "'" + str(path).replace("'", "''") + "'"


def tables_equal(db_a: str | Path, db_b: str | Path) -> list[str]:
    """Names of the tables whose full contents differ between two read-model files (every column is
    compared: nothing in the read model depends on when or how often it was projected)."""
    con = duckdb.connect()
    try:
        con.execute(f"ATTACH {_quote(db_a)} AS a (READ_ONLY)")
        con.execute(f"ATTACH {_quote(db_b)} AS b (READ_ONLY)")
        differ = []
        for table in schema.TABLES:
            columns = ", ".join(table.column_names)
            try:
                (count,) = con.execute(
                    f"SELECT count(*) FROM ((SELECT {columns} FROM a.{table.name}"
                    f" EXCEPT ALL SELECT {columns} FROM b.{table.name})"
                    f" UNION ALL (SELECT {columns} FROM b.{table.name}"
                    f" EXCEPT ALL SELECT {columns} FROM a.{table.name}))"
                ).fetchone()  # type: ignore[misc]
            except (duckdb.CatalogException, duckdb.BinderException):
                count = 1  # missing, or with other columns, in one of them
            if count:
                differ.append(table.name)
        return differ
    finally:
        con.close()
