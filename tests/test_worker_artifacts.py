"""Result events and the artifacts store: a test list too big for one event moves to the object store."""

from __future__ import annotations

from pathlib import Path

import msgspec

from dtf import events as ev
from dtf.spec import TaskSpec
from dtf.streams import topology
from dtf.workers import artifacts
from dtf.workers.results import count
from dtf.workers.runner import RunResult

ASSIGNMENT = ev.TaskAssigned(run_id="r1", task_id="t1", attempt=2, worker_id="w1", coordinator="c",
                             spec=TaskSpec(type="test", config={"paths": ["tests"]}))


def run_result(tests: list[ev.TestOutcome]) -> RunResult:
    return RunResult(outcome="passed", exit_code=0, duration_s=1.0, counts=count(tests), tests=tests,
                     metrics={}, labels={}, output_tail="ok", log_path=Path("/nonexistent"))


async def test_a_small_test_list_stays_inline(js):
    tests = [ev.TestOutcome(nodeid="tests/test_a.py::test_one", outcome="passed")]
    event = await artifacts.result_event(js._nc, js, ASSIGNMENT, run_result(tests), "logs/t1/2")
    assert (event.id, event.tests, event.tests_ref, event.log_ref) == ("result-t1-2", tests, None, "logs/t1/2")


async def test_a_test_list_too_big_for_an_event_moves_to_the_artifacts_store(js):
    tests = [
        ev.TestOutcome(nodeid=f"tests/test_big.py::test_case[{'x' * 80}-{i}]", outcome="passed", duration_s=0.1)
        for i in range(6000)
    ]
    event = await artifacts.result_event(js._nc, js, ASSIGNMENT, run_result(tests), None)
    assert event.tests == [] and event.tests_ref == "results/t1/2.json"
    assert event.counts.passed == 6000
    assert len(ev.encode(event)) < artifacts.MAX_INLINE_EVENT
    store = await js.object_store(topology.artifacts_bucket(ASSIGNMENT.worker_id))
    stored = msgspec.json.decode((await store.get(event.tests_ref)).data, type=list[ev.TestOutcome])
    assert stored == tests
