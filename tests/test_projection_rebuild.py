"""Rebuilding the read model from the streams: whole, up to a sequence or a time, never over a file in
use; and comparing two read models table by table."""

from datetime import timedelta

import duckdb
import pytest

from dtf.projections import sample, schema
from dtf.projections.projection import Projection
from dtf.projections.rebuild import rebuild, tables_equal


def statuses(path):
    with Projection.open(path) as projection:
        return dict(projection.con.execute("SELECT task_id, status FROM tasks").fetchall())


async def test_a_rebuild_reports_what_it_read_and_applied(js, tmp_path):
    await sample.publish_history(js, sample.history("r1"))
    counts = await rebuild(js, tmp_path / "db.duckdb")
    assert counts == {
        "events": 35, "heartbeats": 3, "applied": 32, "ignored": 1, "invalid": 3, "duplicates": 2,
        "stale": 0, "last_seq": 35, "heartbeats_last_seq": 6,
    }
    assert not (tmp_path / "db.duckdb.rebuild").exists()


async def test_a_rebuild_up_to_a_sequence_shows_the_tasks_as_they_were_then(js, tmp_path):
    await sample.publish_history(js, sample.history("r1"))
    # Seq 5 is r1-t1's TaskStarted: r1-t1 is running and nothing else has been submitted yet.
    counts = await rebuild(js, tmp_path / "then.duckdb", upto_seq=5)
    assert counts["last_seq"] == 5
    assert statuses(tmp_path / "then.duckdb") == {"r1-t1": "running"}
    # Heartbeats later than the last event kept are not part of that past.
    assert counts["heartbeats"] == 0


async def test_a_rebuild_until_a_time_stops_before_the_first_later_event(js, tmp_path):
    await sample.publish_history(js, sample.history("r1"))
    until = sample.T0 + timedelta(seconds=13)  # r1-t2's first attempt has just been lost
    await rebuild(js, tmp_path / "then.duckdb", until=until)
    assert statuses(tmp_path / "then.duckdb") == {"r1-t1": "passed", "r1-t2": "pending"}


async def test_a_rebuild_never_replaces_a_file_unless_told_to_and_never_one_in_use(js, tmp_path):
    await sample.publish_history(js, sample.history("r1"))
    target = tmp_path / "db.duckdb"
    await rebuild(js, target, upto_seq=3)
    with pytest.raises(FileExistsError):
        await rebuild(js, target)
    await rebuild(js, target, overwrite=True)
    assert statuses(target)["r1-t2"] == "failed"


def test_tables_equal_names_the_tables_that_differ(tmp_path):
    history = sample.history("r1")
    for name in ("a", "b"):
        with Projection.open(tmp_path / f"{name}.duckdb") as projection:
            projection.apply_batch(history.stored(), history.tests())
    assert tables_equal(tmp_path / "a.duckdb", tmp_path / "b.duckdb") == []
    with duckdb.connect(str(tmp_path / "b.duckdb")) as con:
        con.execute("UPDATE workers SET last_heartbeat = last_heartbeat + INTERVAL 1 SECOND "
                    "WHERE worker_id = 'r1-w1'")
        con.execute("DELETE FROM test_results WHERE nodeid LIKE '%test_skip'")
    assert tables_equal(tmp_path / "a.duckdb", tmp_path / "b.duckdb") == ["workers", "test_results"]


def test_tables_equal_counts_a_missing_or_reshaped_table_as_different(tmp_path):
    with Projection.open(tmp_path / "a.duckdb"):
        pass
    with duckdb.connect(str(tmp_path / "b.duckdb")) as con:
        con.execute("CREATE TABLE tasks (task_id VARCHAR)")
    assert tables_equal(tmp_path / "a.duckdb", tmp_path / "b.duckdb") == [t.name for t in schema.TABLES]
