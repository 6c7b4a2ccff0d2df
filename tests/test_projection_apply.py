"""The projection without a server: the sample history's raw messages applied to an in-memory DuckDB."""

import duckdb
import msgspec
import pytest

from dtf import events as ev
from dtf import subjects
from dtf.projections import sample, schema
from dtf.projections.projection import Projection
from dtf.spec import TaskSpec
from dtf.state import Fold
from dtf.streams.bus import StoredMsg
from dtf.streams.topology import EVENTS, HEARTBEATS


@pytest.fixture
def history():
    return sample.history()


@pytest.fixture
def projected(history):
    projection = Projection.open(":memory:")
    projection.apply_batch(history.stored(), history.tests())
    yield projection
    projection.close()


def rows(projection, sql, *params):
    return projection.con.execute(sql, list(params)).fetchall()


def test_task_statuses_are_exactly_what_the_coordinators_fold_says(history, projected):
    fold = Fold()
    for message in history.stored():
        fold.apply(message.subject, message.seq, message.data)
    expected = {task_id: task.status for task_id, task in fold.tasks.items()}
    assert dict(rows(projected, "SELECT task_id, status FROM tasks")) == expected
    assert expected == {
        "r1-t1": "passed", "r1-t2": "failed", "r1-t3": "passed", "r1-t4": "cancelled",
        "r1-t5": "cancelled", "r1-t6": "passed", "r1-t9": "rejected",
    }


def test_every_attempt_has_a_row_that_says_how_it_ended(projected):
    attempts = rows(
        projected, "SELECT task_id, attempt, worker_id, status, reason FROM attempts ORDER BY ALL"
    )
    assert attempts == [
        ("r1-t1", 1, "r1-w1", "passed", ""),
        ("r1-t2", 1, "r1-w2", "error", "worker: worker stopped heartbeating"),
        ("r1-t2", 2, "r1-w1", "failed", "1 failed, 1 error"),
        ("r1-t3", 1, "r1-w2", "released", "draining"),
        ("r1-t3", 2, "r1-w1", "passed", ""),
        ("r1-t4", 1, "r1-w2", "cancelled", "no longer needed"),
        ("r1-t6", 1, "r1-w1", "passed", ""),
    ]


def test_a_result_forged_by_a_worker_that_was_not_assigned_is_kept_but_changes_nothing(projected):
    assert rows(projected, "SELECT applied FROM events WHERE event_id = 'r1-t1-1-result-r1-w2'") == [(False,)]
    assert rows(projected, "SELECT count(*) FROM test_results WHERE nodeid LIKE '%forged%'") == [(0,)]
    assert rows(projected, "SELECT status, failed FROM tasks WHERE task_id = 'r1-t1'") == [("passed", 0)]


def test_test_results_carry_the_workers_hardware_and_come_from_the_artifacts_store(projected):
    found = rows(projected, "SELECT task_id, attempt, nodeid, outcome, hardware FROM test_results "
                            "WHERE task_id = 'r1-t2' ORDER BY nodeid")
    assert found == [
        ("r1-t2", 2, "tests/slow/test_c.py::test_bad", "failed", ["cpu", "cuda"]),
        ("r1-t2", 2, "tests/slow/test_c.py::test_err", "error", ["cpu", "cuda"]),
        ("r1-t2", 2, "tests/slow/test_c.py::test_ok", "passed", ["cpu", "cuda"]),
    ]
    assert rows(projected, "SELECT name, value FROM metrics ORDER BY name") == [
        ("latency_ms", 8.25), ("rss_mb", 512.0), ("throughput", 1234.5),
    ]


def test_an_event_stored_twice_is_applied_once(history, projected):
    assert rows(projected, "SELECT count(*) FROM events WHERE event_id = 'r1-t1-1-result-r1-w1'") == [(1,)]
    assert rows(projected, "SELECT count(*) FROM test_results WHERE task_id = 'r1-t1'") == [(3,)]
    # Without the ledger the second registration would bring the worker that left back online.
    assert rows(projected, "SELECT status FROM workers WHERE worker_id = 'r1-w2'") == [("left",)]


def test_messages_that_cannot_be_accepted_are_kept_with_the_reason(projected):
    invalid = rows(projected, "SELECT stream, subject, reason FROM invalid_events ORDER BY stream, seq")
    assert [(stream, subject) for stream, subject, _ in invalid] == [
        (EVENTS, "dtf.task.r1.r1-t3.result.r1-w1"),
        (EVENTS, "dtf.task.r1.r1-t9.submitted.alice"),
        (HEARTBEATS, "dtf.hb.r1-w3"),
    ]
    assert "belongs on dtf.task.r1.r1-t3.result.r1-w2" in invalid[0][2]
    assert invalid[1][2].startswith("not an event object")


def test_heartbeats_keep_the_last_one_per_worker_like_their_stream(projected):
    heartbeat_rows = "SELECT subject, seq FROM events WHERE stream = ? ORDER BY subject"
    assert rows(projected, heartbeat_rows, HEARTBEATS) == [
        ("dtf.hb.r1-w1", 5), ("dtf.hb.r1-w2", 4),
    ]
    last_heartbeats = "SELECT worker_id, strftime(last_heartbeat, '%H:%M:%S') FROM workers ORDER BY 1"
    assert rows(projected, last_heartbeats) == [
        ("r1-w1", "00:00:37"), ("r1-w2", "00:00:35"),
    ]


def test_a_redelivered_batch_changes_nothing(history, projected):
    before = schema.contents(projected.con)
    result = projected.apply_batch(history.stored(), history.tests())
    assert result.stale == len(history.stored()) and result.applied == 0
    assert schema.contents(projected.con) == before


def test_a_reopened_projection_resumes_its_fold_from_the_tables(history, tmp_path):
    messages = history.stored()
    with Projection.open(tmp_path / "a.duckdb") as first:
        first.apply_batch(messages[:20], history.tests())
        fold_then = (first.fold.tasks, first.fold.workers)
    with Projection.open(tmp_path / "a.duckdb") as reopened:
        assert (reopened.fold.tasks, reopened.fold.workers) == fold_then
        assert reopened.checkpoint(EVENTS) == 20
        reopened.apply_batch(messages, history.tests())
        resumed = schema.contents(reopened.con)
    with Projection.open(tmp_path / "b.duckdb") as straight:
        straight.apply_batch(messages, history.tests())
        assert schema.contents(straight.con) == resumed


def test_a_batch_that_fails_leaves_neither_rows_nor_fold_state_behind(history, monkeypatch):
    projection = Projection.open(":memory:")
    messages = history.stored()
    projection.apply_batch(messages[:10], history.tests())
    before = schema.contents(projection.con)
    original = Projection._upsert

    def failing(self, table, table_rows, replace=True):
        if table is schema.EVENTS:
            raise duckdb.IOException("disk full")
        return original(self, table, table_rows, replace)

    monkeypatch.setattr(Projection, "_upsert", failing)
    with pytest.raises(duckdb.IOException):
        projection.apply_batch(messages, history.tests())
    assert schema.contents(projection.con) == before
    assert set(projection.fold.tasks) == {"r1-t1", "r1-t2"} and projection.checkpoint(EVENTS) == 10

    monkeypatch.setattr(Projection, "_upsert", original)
    projection.apply_batch(messages, history.tests())
    clean = Projection.open(":memory:")
    clean.apply_batch(messages, history.tests())
    assert schema.contents(projection.con) == schema.contents(clean.con)


def test_an_event_id_reused_by_another_party_does_not_shadow_the_real_event():
    spec = TaskSpec(type="command", config={"command": "true"})
    real = ev.ResultReported(id="result-t1-1", run_id="r", task_id="t1", attempt=1, worker_id="w1",
                             outcome="passed")
    events = [
        ev.TaskSubmitted(run_id="r", task_id="t1", submitter="alice", spec=spec),
        ev.TaskAssigned(run_id="r", task_id="t1", attempt=1, worker_id="w1", coordinator="c", spec=spec),
        msgspec.structs.replace(real, worker_id="w2", outcome="failed"),  # w2 guessed the id
        real,
    ]
    messages = [
        StoredMsg(EVENTS, seq, subjects.subject_for(e), ev.encode(e)) for seq, e in enumerate(events, 1)
    ]
    projection = Projection.open(":memory:")
    result = projection.apply_batch(messages)
    assert (result.applied, result.ignored, result.duplicates) == (3, 1, 0)
    assert rows(projection, "SELECT status FROM tasks") == [("passed",)]
