"""The `durations` read-model query: recent passed durations per test, for history-based splitting."""

import json
from datetime import UTC, datetime, timedelta

import pytest

from dtf.projections import queries
from dtf.projections.projection import Projection

T0 = datetime(2026, 1, 1, tzinfo=UTC)


@pytest.fixture
def con():
    projection = Projection.open(":memory:")
    yield projection.con
    projection.close()


def record(con, task_id, nodeid, outcome, duration_s, minute, project="team-a"):
    con.execute("INSERT INTO tasks (task_id, run_id, project) SELECT $t, $t, $p WHERE NOT EXISTS "
                "(SELECT 1 FROM tasks WHERE task_id = $t)", {"t": task_id, "p": project})
    con.execute("INSERT INTO test_results (run_id, task_id, attempt, worker_id, nodeid, outcome, duration_s,"
                " time) VALUES ($t, $t, 1, 'w', $n, $o, $d, $time)",
                {"t": task_id, "n": nodeid, "o": outcome, "d": duration_s,
                 "time": T0 + timedelta(minutes=minute)})


def ask(con, request):
    return json.loads(queries.answer(con, "durations", json.dumps(request).encode()))


def test_each_test_gets_the_median_of_its_last_passed_runs(con):
    for minute, seconds in enumerate([100.0, 1.0, 2.0, 3.0]):
        record(con, f"t{minute}", "tests/test_a.py::test_x", "passed", seconds, minute)
    record(con, "t9", "tests/test_a.py::test_x", "failed", 50.0, 9)
    reply = ask(con, {"files": ["tests/test_a.py"], "last": 3})
    assert reply == {"durations": [{"nodeid": "tests/test_a.py::test_x", "duration_s": 2.0, "runs": 3}],
                     "next_offset": None}


def test_a_test_recorded_relative_to_a_deeper_rootdir_matches_the_requested_file(con):
    record(con, "t1", "test_a.py::test_x", "passed", 1.5, 0)
    record(con, "t2", "other/test_a.py::test_y", "passed", 9.0, 0)
    record(con, "t3", "test_b.py::test_z", "passed", 9.0, 0)
    found = ask(con, {"files": ["tests/test_a.py"]})["durations"]
    assert [(d["nodeid"], d["duration_s"]) for d in found] == [("test_a.py::test_x", 1.5)]


def test_the_project_narrows_the_history_to_its_own_tasks(con):
    record(con, "mine", "test_a.py::test_x", "passed", 1.0, 0, project="team-a")
    record(con, "theirs", "test_a.py::test_x", "passed", 5.0, 1, project="team-b")
    assert ask(con, {"files": ["test_a.py"], "project": "team-b"})["durations"][0]["duration_s"] == 5.0
    assert ask(con, {"files": ["test_a.py"]})["durations"][0]["runs"] == 2


def test_a_request_without_files_is_an_error_reply(con):
    assert "error" in ask(con, {"project": "x"})
    assert ask(con, {"files": []}) == {"durations": [], "next_offset": None}


def test_a_long_answer_comes_in_pages_that_together_hold_every_test_once(con):
    for i in range(30):
        record(con, f"t{i}", f"tests/test_a.py::test_{i:02d}", "passed", float(i), i)
    pages, offset = [], 0
    while offset is not None:
        reply = ask(con, {"files": ["tests/test_a.py"], "limit": 7, "offset": offset})
        pages.append(reply["durations"])
        offset = reply["next_offset"]
    assert [len(p) for p in pages] == [7, 7, 7, 7, 2]
    assert [d["nodeid"] for p in pages for d in p] == [f"tests/test_a.py::test_{i:02d}" for i in range(30)]


def test_a_submitter_asking_on_its_scoped_subject_sees_only_its_own_runs_history(con):
    record(con, "mine", "test_a.py::test_x", "passed", 1.0, 0)
    record(con, "theirs", "test_a.py::test_x", "passed", 5.0, 1)
    con.execute("UPDATE tasks SET submitter = CASE task_id WHEN 'mine' THEN 'alice' ELSE 'bob' END")
    reply = json.loads(queries.answer(con, "durations", b'{"files": ["test_a.py"]}', party="alice"))
    assert reply["durations"] == [{"nodeid": "test_a.py::test_x", "duration_s": 1.0, "runs": 1}]
