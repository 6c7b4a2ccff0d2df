"""The query functions on a projected database: reply shapes, paging under the NATS payload limit and
error replies for requests that make no sense."""

import json
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from dtf import events as ev
from dtf import subjects
from dtf.projections import queries, sample
from dtf.projections.projection import Projection
from dtf.spec import TaskSpec
from dtf.streams.bus import StoredMsg
from dtf.streams.topology import EVENTS


@pytest.fixture
def projection():
    history = sample.history()
    projection = Projection.open(":memory:")
    projection.apply_batch(history.stored(), history.tests())
    yield projection
    projection.close()


def ask(projection, name, request=b""):
    return json.loads(queries.answer(projection.con, name, request))


def test_tasks_are_listed_with_their_state_and_test_counts(projection):
    tasks = ask(projection, "tasks", b'{"run_id": "r1"}')["tasks"]
    assert [(t["task_id"], t["state"]) for t in tasks] == [
        ("r1-t1", "passed"), ("r1-t2", "failed"), ("r1-t3", "passed"), ("r1-t4", "cancelled"),
        ("r1-t5", "cancelled"), ("r1-t6", "passed"), ("r1-t9", "rejected"),
    ]
    assert tasks[1] | {"submitted_at": None, "finished_at": None} == {
        "task_id": "r1-t2", "run_id": "r1", "type": "test", "name": "", "state": "failed",
        "worker_id": "r1-w1", "attempts": 2, "duration_s": 7.0,
        "tests": {"passed": 1, "failed": 1, "skipped": 0, "errors": 1}, "reason": "", "priority": 5,
        "submitted_at": None, "finished_at": None,
    }
    assert ask(projection, "tasks", b'{"run_id": "nope"}') == {"tasks": [], "next_offset": None}


def test_workers_show_their_capabilities_and_last_heartbeat(projection):
    workers = ask(projection, "workers")["workers"]
    assert [(w["worker_id"], w["state"], w["last_heartbeat"]) for w in workers] == [
        ("r1-w1", "online", "2025-01-01T00:00:37+00:00"), ("r1-w2", "left", "2025-01-01T00:00:35+00:00"),
    ]
    assert workers[0]["capabilities"]["gpus"][0]["name"] == "A100"


def test_results_can_be_narrowed_to_a_task(projection):
    results = ask(projection, "results", b'{"run_id": "r1", "task_id": "r1-t1"}')["results"]
    assert [(r["nodeid"], r["outcome"]) for r in results] == [
        ("tests/unit/test_a.py::test_one", "passed"), ("tests/unit/test_a.py::test_two", "passed"),
        ("tests/unit/test_b.py::test_skip", "skipped"),
    ]


def test_status_reports_checkpoints_and_counts(projection):
    assert ask(projection, "status") == {
        "checkpoints": {"DTF_EVENTS": 35, "DTF_HEARTBEATS": 6}, "events": 33, "invalid_events": 3,
        "tasks": 7, "workers": 2,
    }


@pytest.mark.parametrize("name, request_body", [
    ("tasks", b"not json"),
    ("tasks", b'{"run_id": 5}'),
    ("tasks", b'{"offset": -1}'),
    ("results", b'{"limit": 0}'),
    ("workers", b'{"colour": "blue"}'),
    ("status", b"[]"),
    ("drop_tables", b"{}"),
])
def test_a_bad_request_gets_an_error_reply(projection, name, request_body):
    reply = ask(projection, name, request_body)
    assert list(reply) == ["error"] and reply["error"]


def big_run(tasks=40, tests_per_task=60):
    """Results whose listing is several MB: long failure messages, as a broken test suite gives."""
    t0 = datetime(2025, 1, 1, tzinfo=UTC)
    messages = []
    for i in range(tasks):
        task_id = f"t{i:03d}"
        spec = TaskSpec(type="command", config={"command": "true"})
        tests = [ev.TestOutcome(nodeid=f"tests/test_{j:03d}.py::test", outcome="failed",
                                message="Traceback " * 200) for j in range(tests_per_task)]
        for event in (
            ev.TaskSubmitted(run_id="big", task_id=task_id, submitter="ci", spec=spec, time=t0),
            ev.TaskAssigned(run_id="big", task_id=task_id, attempt=1, worker_id="w", coordinator="c",
                            spec=spec, time=t0 + timedelta(seconds=1)),
            ev.ResultReported(run_id="big", task_id=task_id, attempt=1, worker_id="w", outcome="failed",
                              tests=tests, time=t0 + timedelta(seconds=2)),
        ):
            seq = len(messages) + 1
            messages.append(StoredMsg(EVENTS, seq, subjects.subject_for(event), ev.encode(event)))
    return messages


def test_a_listing_over_the_payload_limit_comes_in_pages_that_join_up():
    projection = Projection.open(":memory:")
    projection.apply_batch(big_run())
    pages, offset = [], 0
    while offset is not None:
        request = msgspec.json.encode({"run_id": "big", "offset": offset})
        raw = queries.answer(projection.con, "results", request)
        assert len(raw) < 1024 * 1024
        reply = json.loads(raw)
        pages.append(reply["results"])
        offset = reply["next_offset"]
    assert len(pages) > 1
    joined = [(r["task_id"], r["nodeid"]) for page in pages for r in page]
    assert joined == sorted(joined) and len(joined) == len(set(joined)) == 40 * 60


def test_a_limit_makes_smaller_pages():
    projection = Projection.open(":memory:")
    projection.apply_batch(big_run(tasks=2, tests_per_task=5))
    first = ask(projection, "results", b'{"limit": 4}')
    second = ask(projection, "results", b'{"limit": 4, "offset": 4}')
    last = ask(projection, "results", b'{"limit": 4, "offset": 8}')
    assert (len(first["results"]), first["next_offset"]) == (4, 4)
    assert (len(second["results"]), second["next_offset"]) == (4, 8)
    assert (len(last["results"]), last["next_offset"]) == (2, None)
