"""The read model's write side: stored stream messages in, DuckDB rows out, one transaction per batch.

`Projection` wraps a DuckDB connection and a `dtf.state.Fold`. The fold is the coordinator's own code,
so a task's status here is exactly the coordinator's. At open the fold is loaded from the `state`
columns (the snapshot), so a restart resumes at the checkpoint instead of replaying from zero.

Per message, in order: skip it if the stream's checkpoint already covers it, skip it if the ledger
already holds its (subject, event id) — JetStream only deduplicates within 2 minutes — then fold it
with `Fold.apply` and stage the rows it changed. The ledger key includes the subject because the
subject carries the publisher's identity: a party reusing another's event id (ids are often
predictable) cannot make the real event look like a duplicate. The batch's rows and checkpoints are written in the
same transaction, so a crash anywhere leaves the database at a batch boundary and redelivery of a
committed batch changes nothing.

DTF_HEARTBEATS keeps one message per worker, so it is tracked per subject: `events`/`invalid_events`
keep the last heartbeat message of each worker, exactly as the stream does, and a rebuilt database
equals the live one however many heartbeats the live projector saw.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Protocol

import duckdb
import msgspec

from dtf import events as ev
from dtf import subjects, wire
from dtf.projections import anomalies, rows, schema
from dtf.state import ACTIVE, Fold, TaskState, WorkerState
from dtf.streams.topology import EVENTS, HEARTBEATS


class Message(Protocol):
    """A stored stream message: `dtf.streams.bus.StoredMsg` or anything shaped like it."""

    stream: str
    seq: int
    subject: str
    data: bytes


@dataclass
class BatchResult:
    """What a batch did, message by message."""

    applied: int = 0
    """Admitted events that changed a task or a worker."""
    ignored: int = 0
    """Admitted events the fold ignored: late, stale or forged (kept in `events` with applied=false)."""
    invalid: int = 0
    """Messages that could not be admitted (kept in `invalid_events`)."""
    duplicates: int = 0
    """Events whose (subject, id) the ledger already held: republished after the dedup window."""
    stale: int = 0
    """Messages at or below the checkpoint: a redelivery of something already committed."""

    def add(self, other: BatchResult) -> BatchResult:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))
        return self

    def as_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


class _Envelope(msgspec.Struct):
    id: str = ""


_envelope = msgspec.json.Decoder(_Envelope)
_task_state = msgspec.json.Decoder(TaskState)
_worker_state = msgspec.json.Decoder(WorkerState)


def _event_id(data: bytes) -> str:
    """The event id the ledger keys on; "" for a message that is no event (the fold records why)."""
    try:
        return wire.decode(data, _envelope).id
    except wire.WireError:
        return ""


@dataclass
class _Staged:
    """A batch's writes, keyed so each row is written once per transaction with its final value."""

    tasks: dict[str, TaskState] = field(default_factory=dict)
    workers: dict[str, WorkerState] = field(default_factory=dict)
    attempts: dict[tuple[str, int], dict] = field(default_factory=dict)
    test_results: list[dict] = field(default_factory=list)
    metrics: list[dict] = field(default_factory=list)
    detections: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    invalid: list[dict] = field(default_factory=list)
    heartbeats: dict[str, dict] = field(default_factory=dict)
    """subject -> the row (events or invalid_events) of its newest heartbeat message."""
    checkpoints: dict[str, int] = field(default_factory=dict)


class Projection:
    """The fold plus its tables. Thread-safe for one writer at a time (`apply_batch`, `close`);
    readers use their own cursors (`con.cursor()`), which see the last committed batch."""

    def __init__(self, con: duckdb.DuckDBPyConnection) -> None:
        self.con = con
        self._lock = threading.Lock()
        schema.create(con)
        self._load()

    @classmethod
    def open(cls, path: str | Path) -> Projection:
        """Open (or create, with its directory) the database file; ':memory:' for a throwaway one."""
        if str(path) != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        return cls(duckdb.connect(str(path)))

    def _load(self) -> None:
        """The snapshot: fold state and checkpoints exactly as last committed."""
        self.fold = Fold()
        # In submission order, so each run's owner is the submitter of its first admitted task.
        for (state,) in self.con.execute("SELECT state FROM tasks ORDER BY submitted_at, task_id").fetchall():
            task = _task_state.decode(state)
            self.fold.tasks[task.task_id] = task
            if task.submitter:
                self.fold.owners.setdefault(task.run_id, task.submitter)
            if task.status in ACTIVE:
                self.fold.active.setdefault(task.worker_id, set()).add(task.task_id)
        for (state,) in self.con.execute("SELECT state FROM workers").fetchall():
            worker = _worker_state.decode(state)
            self.fold.workers[worker.worker_id] = worker
        self._checkpoints: dict[str, int] = dict(
            self.con.execute("SELECT stream, seq FROM checkpoints").fetchall()
        )
        self.fold.last_seq = self._checkpoints.get(EVENTS, 0)
        self._heartbeat_seq: dict[str, int] = dict(self.con.execute(
            "SELECT subject, max(seq) FROM (SELECT subject, seq FROM events WHERE stream = $s "
            "UNION ALL SELECT subject, seq FROM invalid_events WHERE stream = $s) GROUP BY subject",
            {"s": HEARTBEATS},
        ).fetchall())

    def checkpoint(self, stream: str) -> int:
        """The last sequence of `stream` that is committed (0 before any)."""
        return self._checkpoints.get(stream, 0)

    def checkpoints(self) -> dict[str, int]:
        return dict(self._checkpoints)

    # --- applying -------------------------------------------------------------------------------

    def apply_batch(
        self, messages: Sequence[Message], tests: Mapping[tuple[str, str], list[ev.TestOutcome]] | None = None,
    ) -> BatchResult:
        """Apply messages (each stream's in sequence order) in one transaction. `tests` maps a
        ResultReported's (worker_id, tests_ref) to the list fetched from that worker's artifacts bucket."""
        with self._lock:
            result = BatchResult()
            staged = _Staged()
            self.con.begin()  # outside the try: nothing to roll back if it fails
            try:
                seen = self._ledger_hits(messages)
                for message in messages:
                    self._apply_one(message, staged, seen, tests or {}, result)
                self._write(staged)
                self.con.commit()
            except BaseException:
                self.con.rollback()
                self._load()  # the fold saw part of a batch that is not in the tables
                raise
            finally:
                # The coordinator's concurrency tokens and pending rejections: not needed here.
                self.fold.task_seq.clear()
                self.fold.invalid.clear()
            return result

    def _ledger_hits(self, messages: Sequence[Message]) -> set[tuple[str, str]]:
        """(subject, event id) pairs of this batch's task/worker events already in the ledger."""
        candidates = {
            (m.subject, _event_id(m.data)) for m in messages
            if m.stream != HEARTBEATS and m.seq > self.checkpoint(m.stream)
        }
        ids = sorted({event_id for _, event_id in candidates if event_id})
        if not ids:
            return set()
        # A literal IN list, so DuckDB looks each id up in the event_id index: the cost stays per
        # batch, not per event ever projected.
        found = self.con.execute(
            f"SELECT subject, event_id FROM events WHERE event_id IN ({', '.join('?' * len(ids))})", ids,
        ).fetchall()
        return {hit for hit in map(tuple, found) if hit in candidates}

    def _apply_one(
        self, msg: Message, staged: _Staged, seen: set[tuple[str, str]],
        tests: Mapping[tuple[str, str], list[ev.TestOutcome]], result: BatchResult,
    ) -> None:
        heartbeat = msg.stream == HEARTBEATS
        if heartbeat:
            if msg.seq <= self._heartbeat_seq.get(msg.subject, 0):
                result.stale += 1
                return
            self._heartbeat_seq[msg.subject] = msg.seq
        elif msg.seq <= self.checkpoint(msg.stream):
            result.stale += 1
            return
        self._checkpoints[msg.stream] = max(msg.seq, self.checkpoint(msg.stream))
        staged.checkpoints[msg.stream] = self._checkpoints[msg.stream]

        key = (msg.subject, _event_id(msg.data))
        if not heartbeat and key in seen:
            result.duplicates += 1
            return
        parsed = subjects.parse(msg.subject)
        task_before = self.fold.tasks.get(parsed.task_id) if parsed.task_id else None
        worker_before = self.fold.workers.get(parsed.party)

        applied = self.fold.apply(msg.subject, msg.seq, msg.data)
        if applied.event is None:
            row = rows.invalid_row(msg.stream, msg.seq, msg.subject, applied.invalid_reason or "", msg.data)
            if heartbeat:
                staged.heartbeats[msg.subject] = {"invalid": row}
            else:
                staged.invalid.append(row)
            result.invalid += 1
            return
        event = applied.event
        if isinstance(event, ev.TaskEvent):
            changed = self._stage_task(event, task_before, staged, tests)
            if isinstance(event, ev.Detection):  # the detector's finding: no task changes, a row does
                staged.detections.append(anomalies.detection_row(msg.stream, msg.seq, event))
                changed = True
            worker_after = self.fold.workers.get(parsed.party)
            if worker_after is not None and worker_after is not worker_before:
                staged.workers[parsed.party] = worker_after  # an attempt's verdict on its worker's health
        else:
            changed = self._stage_worker(event, worker_before, staged)
        if heartbeat:
            staged.heartbeats[msg.subject] = {
                "event": rows.event_row(msg.stream, msg.seq, msg.subject, event, changed)
            }
        else:
            seen.add(key)
            staged.events.append(rows.event_row(msg.stream, msg.seq, msg.subject, event, changed))
        if changed:
            result.applied += 1
        else:
            result.ignored += 1

    def _stage_task(
        self, event: ev.TaskEvent, before: TaskState | None, staged: _Staged,
        tests: Mapping[tuple[str, str], list[ev.TestOutcome]],
    ) -> bool:
        after = self.fold.tasks.get(event.task_id)
        if after is None or after is before:
            return False
        staged.tasks[event.task_id] = after
        attempt = rows.attempt_row(before, after, event)
        if attempt is not None:
            staged.attempts[(attempt["task_id"], attempt["attempt"])] = attempt
        if isinstance(event, ev.ResultReported):
            outcomes = event.tests or (tests.get((event.worker_id, event.tests_ref), []) if event.tests_ref else [])
            hardware = self._hardware(event.worker_id)
            staged.test_results += rows.test_rows(event, outcomes, hardware)
            staged.metrics += rows.metric_rows(event, hardware)
        return True

    def _hardware(self, worker_id: str) -> list[str]:
        """A registered worker's hardware. Registration lives in DTF_EVENTS only, so this does not
        depend on how heartbeats interleave with events (live and rebuilt tables agree)."""
        worker = self.fold.workers.get(worker_id)
        if worker is None or worker.registered_at is None:
            return []
        return list(worker.capabilities.hardware)

    def _stage_worker(self, event: ev.Event, before: WorkerState | None, staged: _Staged) -> bool:
        worker_id = event.worker_id  # type: ignore[attr-defined]
        after = self.fold.workers.get(worker_id)
        if isinstance(event, ev.WorkerHeartbeat):
            # Whether this heartbeat is the worker's latest: the same answer live and in a rebuild
            # that sees only the last heartbeat per worker (for a worker whose clock moves forward).
            if after is not None and after is not before:
                staged.workers[worker_id] = after
            return after is not None and after.last_heartbeat == event.time
        if after is None or after is before:
            return False
        staged.workers[worker_id] = after
        return True

    # --- writing --------------------------------------------------------------------------------

    def _upsert(self, table: schema.Table, table_rows: list[dict], replace: bool = True) -> None:
        if not table_rows:
            return
        self.con.register("_batch", table.arrow(table_rows))
        try:
            verb = "INSERT OR REPLACE" if replace else "INSERT"
            self.con.execute(f"{verb} INTO {table.name} SELECT * FROM _batch")
        finally:
            self.con.unregister("_batch")

    def _write(self, staged: _Staged) -> None:
        self._upsert(schema.TASKS, [rows.task_row(t) for t in staged.tasks.values()])
        self._upsert(schema.WORKERS, [rows.worker_row(w) for w in staged.workers.values()])
        self._upsert(schema.ATTEMPTS, list(staged.attempts.values()))
        self._upsert(schema.TEST_RESULTS, staged.test_results, replace=False)
        self._upsert(schema.METRICS, staged.metrics, replace=False)
        self._upsert(schema.DETECTIONS, staged.detections, replace=False)
        if staged.heartbeats:
            replaced = sorted(staged.heartbeats)
            for table in ("events", "invalid_events"):
                self.con.execute(
                    f"DELETE FROM {table} WHERE stream = $hb AND subject IN (SELECT unnest($s::VARCHAR[]))",
                    {"hb": HEARTBEATS, "s": replaced},
                )
        events = staged.events + [r["event"] for r in staged.heartbeats.values() if "event" in r]
        invalid = staged.invalid + [r["invalid"] for r in staged.heartbeats.values() if "invalid" in r]
        self._upsert(schema.EVENTS, events, replace=False)
        self._upsert(schema.INVALID_EVENTS, invalid, replace=False)
        self._upsert(schema.CHECKPOINTS, [
            {"stream": stream, "seq": seq} for stream, seq in sorted(staged.checkpoints.items())
        ])

    # --- lifecycle ------------------------------------------------------------------------------

    def flush(self) -> None:
        """Fold the write-ahead log into the database file."""
        with self._lock:
            self.con.execute("CHECKPOINT")

    def close(self) -> None:
        """Close the database once any batch in progress has committed."""
        with self._lock:
            self.con.close()

    def __enter__(self) -> Projection:  # noqa: PYI034 - not meant to be subclassed
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
