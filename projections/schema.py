"""The read model's tables, declared once: DuckDB DDL and the Arrow schema rows are bulk-written with.

Every row is a pure function of the event log (no wall clock, no row ids), so a database rebuilt from
the stream equals the live one table for table. `tasks.state` and `workers.state` hold the full
msgspec-encoded fold state: the projector resumes its fold from them instead of replaying from zero.

    tasks           one row per task: its current TaskState, flattened for queries
    attempts        one row per (task, attempt): who ran it, when, and how it ended
    workers         one row per worker: its current WorkerState
    test_results    one row per test of an accepted ResultReported, with the worker's hardware
    metrics         one row per metric of an accepted ResultReported, with the worker's hardware
    events          the ledger: every admitted event (DTF_HEARTBEATS: the last one per worker)
    invalid_events  messages that could not be accepted, with why and their raw bytes
    checkpoints     the last stream sequence applied, per stream
    detections      one row per RegressionDetected / AnomalyDetected (projections/anomalies.py)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import duckdb
import pyarrow as pa

_ARROW = {
    "VARCHAR": pa.string(),
    "JSON": pa.string(),
    "BIGINT": pa.int64(),
    "DOUBLE": pa.float64(),
    "BOOLEAN": pa.bool_(),
    "BLOB": pa.binary(),
    "TIMESTAMPTZ": pa.timestamp("us", tz="UTC"),
    "VARCHAR[]": pa.list_(pa.string()),
}


@dataclass(frozen=True)
class Table:
    name: str
    columns: tuple[tuple[str, str], ...]
    """(name, DuckDB type) in table order; rows are dicts keyed by these names."""
    key: tuple[str, ...] = ()
    indexes: tuple[str, ...] = ()
    """Columns with an index of their own (point lookups on a table that only grows)."""
    added: Mapping[str, str] = field(default_factory=dict)
    """Columns added after the table was first released -> the SQL value older rows get: what the
    event's field defaults to, so a migrated database equals one rebuilt from the log. They come
    last, in order, so `ALTER TABLE ... ADD COLUMN` gives the declared column order."""

    @property
    def column_names(self) -> list[str]:
        return [name for name, _ in self.columns]

    @property
    def arrow_schema(self) -> pa.Schema:
        return pa.schema([(name, _ARROW[sql]) for name, sql in self.columns])

    def ddl(self) -> str:
        columns = [f"{name} {sql}" for name, sql in self.columns]
        if self.key:
            columns.append(f"PRIMARY KEY ({', '.join(self.key)})")
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n    " + ",\n    ".join(columns) + "\n)"

    def migrations(self, existing: set[str]) -> list[str]:
        """ALTER statements that bring a table with the `existing` columns up to this declaration."""
        return [
            f"ALTER TABLE {self.name} ADD COLUMN {name} {sql} DEFAULT {self.added[name]}"
            for name, sql in self.columns if name not in existing and name in self.added
        ]

    def index_ddl(self) -> list[str]:
        return [
            f"CREATE INDEX IF NOT EXISTS {self.name}_{column} ON {self.name} ({column})"
            for column in self.indexes
        ]

    def arrow(self, rows: list[dict]) -> pa.Table:
        return pa.Table.from_pylist(rows, schema=self.arrow_schema)


TASKS = Table("tasks", (
    ("task_id", "VARCHAR"), ("run_id", "VARCHAR"), ("submitter", "VARCHAR"), ("project", "VARCHAR"),
    ("type", "VARCHAR"), ("name", "VARCHAR"), ("priority", "BIGINT"), ("status", "VARCHAR"),
    ("attempts", "BIGINT"), ("failures", "BIGINT"), ("worker_id", "VARCHAR"),
    ("submitted_at", "TIMESTAMPTZ"), ("assigned_at", "TIMESTAMPTZ"), ("started_at", "TIMESTAMPTZ"),
    ("finished_at", "TIMESTAMPTZ"), ("duration_s", "DOUBLE"),
    ("passed", "BIGINT"), ("failed", "BIGINT"), ("skipped", "BIGINT"), ("errors", "BIGINT"),
    ("reason", "VARCHAR"), ("labels", "JSON"), ("requirements", "JSON"), ("state", "JSON"),
    ("commit", "VARCHAR"), ("branch", "VARCHAR"),
), key=("task_id",))

ATTEMPTS = Table("attempts", (
    ("task_id", "VARCHAR"), ("attempt", "BIGINT"), ("run_id", "VARCHAR"), ("worker_id", "VARCHAR"),
    ("status", "VARCHAR"), ("assigned_at", "TIMESTAMPTZ"), ("started_at", "TIMESTAMPTZ"),
    ("finished_at", "TIMESTAMPTZ"), ("outcome", "VARCHAR"), ("exit_code", "BIGINT"),
    ("duration_s", "DOUBLE"), ("reason", "VARCHAR"), ("log_ref", "VARCHAR"),
), key=("task_id", "attempt"))

WORKERS = Table("workers", (
    ("worker_id", "VARCHAR"), ("host", "VARCHAR"), ("pid", "BIGINT"), ("status", "VARCHAR"),
    ("concurrency", "BIGINT"), ("capabilities", "JSON"), ("hardware", "VARCHAR[]"),
    ("registered_at", "TIMESTAMPTZ"), ("last_heartbeat", "TIMESTAMPTZ"), ("reason", "VARCHAR"),
    ("state", "JSON"),
), key=("worker_id",))

TEST_RESULTS = Table("test_results", (
    ("run_id", "VARCHAR"), ("task_id", "VARCHAR"), ("attempt", "BIGINT"), ("worker_id", "VARCHAR"),
    ("nodeid", "VARCHAR"), ("outcome", "VARCHAR"), ("duration_s", "DOUBLE"), ("message", "VARCHAR"),
    ("time", "TIMESTAMPTZ"), ("hardware", "VARCHAR[]"),
    ("longrepr", "VARCHAR"), ("short", "VARCHAR"), ("file", "VARCHAR"), ("line", "BIGINT"),
    ("classname", "VARCHAR"), ("stdout", "VARCHAR"), ("stderr", "VARCHAR"),
), added={name: "''" for name in ("longrepr", "short", "file", "classname", "stdout", "stderr")} | {"line": "NULL"})
"""The columns after `hardware` came with a failure's details (TestOutcome's optional fields)."""

METRICS = Table("metrics", (
    ("run_id", "VARCHAR"), ("task_id", "VARCHAR"), ("attempt", "BIGINT"), ("worker_id", "VARCHAR"),
    ("name", "VARCHAR"), ("value", "DOUBLE"), ("labels", "JSON"), ("time", "TIMESTAMPTZ"),
    ("hardware", "VARCHAR[]"),
))

EVENTS = Table("events", (
    ("stream", "VARCHAR"), ("seq", "BIGINT"), ("event_id", "VARCHAR"), ("subject", "VARCHAR"),
    ("type", "VARCHAR"), ("time", "TIMESTAMPTZ"), ("applied", "BOOLEAN"),
), key=("stream", "seq"), indexes=("event_id",))
"""`applied` is false for an admitted event the fold ignored (a late or forged result, a stale
assignment): the audit trail of what was said but changed nothing."""

INVALID_EVENTS = Table("invalid_events", (
    ("stream", "VARCHAR"), ("seq", "BIGINT"), ("subject", "VARCHAR"), ("reason", "VARCHAR"),
    ("raw", "BLOB"),
), key=("stream", "seq"))

CHECKPOINTS = Table("checkpoints", (("stream", "VARCHAR"), ("seq", "BIGINT")), key=("stream",))

DETECTIONS = Table("detections", (
    ("stream", "VARCHAR"), ("seq", "BIGINT"), ("event_id", "VARCHAR"), ("kind", "VARCHAR"),
    ("series", "VARCHAR"), ("benchmark", "VARCHAR"), ("metric", "VARCHAR"), ("labels", "JSON"),
    ("hardware", "VARCHAR[]"), ("run_id", "VARCHAR"), ("task_id", "VARCHAR"), ("before", "DOUBLE"),
    ("after", "DOUBLE"), ("size", "DOUBLE"), ("better", "VARCHAR"), ("direction", "VARCHAR"),
    ("confidence", "DOUBLE"), ("detector", "VARCHAR"), ("result_ids", "VARCHAR[]"),
    ("change_run_id", "VARCHAR"), ("time", "TIMESTAMPTZ"), ("owner", "VARCHAR"),
), key=("stream", "seq"), added={"owner": "''"})
"""`owner` came with per-tenant series (the Detection field; "" in detections made before it)."""

TABLES: tuple[Table, ...] = (
    TASKS, ATTEMPTS, WORKERS, TEST_RESULTS, METRICS, EVENTS, INVALID_EVENTS, CHECKPOINTS, DETECTIONS,
)


def create(con: duckdb.DuckDBPyConnection) -> None:
    """Create every table that does not exist yet and add the columns an older database lacks
    (idempotent)."""
    for table in TABLES:
        con.execute(table.ddl())
        existing = {row[0] for row in con.execute(
            "SELECT column_name FROM information_schema.columns WHERE table_name = $t AND table_schema = current_schema()",
            {"t": table.name}).fetchall()}
        for statement in table.migrations(existing):
            con.execute(statement)
        for statement in table.index_ddl():
            con.execute(statement)


def contents(con: duckdb.DuckDBPyConnection) -> dict[str, list[tuple]]:
    """Every table's rows in one canonical order: what "two read models are equal" means."""
    return {
        table.name: con.execute(f"SELECT * FROM {table.name} ORDER BY ALL").fetchall()
        for table in TABLES
    }
