"""Flaky tests on a real read model: a test that both passes and fails on one commit and one kind of
hardware is flagged with its flip rate; a change of commit or hardware, or an unknown commit, is not
flakiness."""

from __future__ import annotations

import json
from datetime import timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf.projections import flaky, queries
from result_history import Finished, project

HOUR = timedelta(hours=1)


def run(i, outcome, commit="abc", worker="w-cpu", nodeid="t.py::racy", branch="main"):
    return Finished(f"r{i}", f"r{i}-t", worker=worker, commit=commit, branch=branch, at=i * HOUR,
                    tests=[(nodeid, outcome, 0.5), ("t.py::solid", "passed", 0.1)])


def flagged(projection, **request):
    return flaky.flaky(projection.con.cursor(), flaky.FlakyRequest(**request))["flaky"]


def test_a_test_that_passes_and_fails_on_one_commit_and_hardware_is_flagged_with_its_flip_rate():
    outcomes = ["passed", "failed", "passed", "passed", "error"]
    [row] = flagged(project([run(i, o) for i, o in enumerate(outcomes)]))
    assert row | {"first_seen": None, "last_seen": None} == {
        "test": "t.py::racy", "commit": "abc", "hardware": "cpu", "runs": 5, "passed": 3, "failed": 2,
        "flips": 3, "flip_rate": 0.75, "first_seen": None, "last_seen": None,
    }


def test_a_failure_after_a_new_commit_or_on_other_hardware_or_without_a_commit_is_not_flaky():
    projection = project([
        run(0, "passed", commit="abc"), run(1, "failed", commit="def"),            # the code changed
        run(2, "passed", worker="w-cpu", nodeid="t.py::gpu"),
        run(3, "failed", worker="w-gpu", nodeid="t.py::gpu"),                       # other hardware
        run(4, "passed", commit="", nodeid="t.py::nocommit"),
        run(5, "failed", commit="", nodeid="t.py::nocommit"),                       # unknown code
        run(6, "passed", nodeid="t.py::skips"), run(7, "skipped", nodeid="t.py::skips"),  # a skip is no failure
    ])
    assert flagged(projection) == []


def test_most_flip_prone_first_and_narrowed_by_branch_and_time():
    history = ([run(i, "passed" if i % 2 else "failed", nodeid="t.py::alternates") for i in range(4)]
               + [run(10 + i, o, nodeid="t.py::once", branch="dev") for i, o in enumerate(["passed"] * 3 + ["failed"])])
    projection = project(history)
    assert [(r["test"], r["flip_rate"]) for r in flagged(projection)] == [
        ("t.py::alternates", 1.0), ("t.py::once", 1 / 3)]
    assert [r["test"] for r in flagged(projection, branch="dev")] == ["t.py::once"]
    later = history[0].time + 9 * HOUR
    assert [r["test"] for r in flagged(projection, since=later)] == ["t.py::once"]


def test_the_flaky_query_answers_by_name():
    reply = json.loads(queries.answer(project([run(0, "passed"), run(1, "failed")]).con, "flaky", b"{}"))
    assert [r["test"] for r in reply["flaky"]] == ["t.py::racy"] and reply["next_offset"] is None


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(outcomes=st.lists(st.sampled_from(["passed", "failed", "error", "skipped"]), max_size=10))
def test_flips_count_the_changes_between_consecutive_runs_that_ran(outcomes):
    rows = flagged(project([run(i, o) for i, o in enumerate(outcomes)]))
    ran = [o == "passed" for o in outcomes if o != "skipped"]
    flips = sum(a != b for a, b in zip(ran, ran[1:]))
    if any(ran) and not all(ran):
        [row] = rows
        assert (row["runs"], row["passed"], row["flips"]) == (len(ran), sum(ran), flips)
        assert row["flip_rate"] == flips / (len(ran) - 1)
    else:
        assert rows == []
