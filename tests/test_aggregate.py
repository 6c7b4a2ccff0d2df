"""Aggregation over a real read model folded from events: grouping, windows, the change against the
previous window, series names, and (hypothesis) counts and statistics equal to a plain recomputation."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from datetime import timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf.projections import aggregate, queries
from dtf.projections.aggregate import AggregateRequest
from result_history import HARDWARE, T0, Finished, project

DAY = timedelta(days=1)


def rows(projection, **request):
    return aggregate.aggregate(projection.con.cursor(), AggregateRequest(**request), now=T0 + 30 * DAY)["aggregate"]


def bench(i, worker, latency, at, model="bert"):
    return Finished(f"run{i}", f"run{i}-b", worker=worker, at=at, type="benchmark", name="infer",
                    labels={"model": model, "batch": "8"}, metrics={"latency_ms": latency, "throughput": 1000 / latency})


def test_tests_group_by_hardware_and_label_with_pass_rates_that_leave_skips_out():
    projection = project([
        Finished("r1", "r1-t", worker="w-cpu", labels={"model": "bert"},
                 tests=[("t.py::a", "passed", 1.0), ("t.py::b", "failed", 3.0), ("t.py::c", "skipped", 0.0)]),
        Finished("r2", "r2-t", worker="w-gpu", labels={"model": "bert"}, tests=[("t.py::a", "passed", 2.0)]),
        Finished("r3", "r3-t", worker="w-gpu", labels={"model": "gpt"}, tests=[("t.py::a", "error", 4.0)]),
    ])
    found = rows(projection, group_by=["hardware", "label.model"])
    assert [(r["hardware"], r["label.model"], r["count"], r["passed"], r["failed"], r["skipped"], r["errors"],
             r["pass_rate"]) for r in found] == [
        ("cpu", "bert", 3, 1, 1, 1, 0, 0.5),
        ("cpu+cuda", "bert", 1, 1, 0, 0, 0, 1.0),
        ("cpu+cuda", "gpt", 1, 0, 0, 0, 1, 0.0),
    ]
    assert found[0]["mean"] == pytest.approx(4 / 3) and found[0]["median"] == 1.0


def test_a_metric_is_aggregated_per_series_with_its_detector_style_name():
    projection = project([bench(i, "w-gpu", 10.0 + i, i * DAY) for i in range(5)]
                         + [bench(9, "w-cpu", 50.0, DAY, model="gpt")])
    found = rows(projection, group_by=["benchmark", "metric", "labels", "hardware"], metric="latency_ms")
    assert [(r["series"], r["count"], r["mean"]) for r in found] == [
        ("infer:latency_ms{batch=8,model=bert}@cpu+cuda", 5, 12.0),
        ("infer:latency_ms{batch=8,model=gpt}@cpu", 1, 50.0),
    ]
    assert found[0]["labels"] == {"batch": "8", "model": "bert"}
    assert found[0]["p95"] == pytest.approx(13.8) and found[0]["stddev"] == pytest.approx(statistics.stdev(range(10, 15)))


def test_windows_compare_each_with_the_previous_one_that_has_data():
    values = [10, 10, 10, 12, 12, 12]  # two days of three runs each, 20 % slower on day two
    projection = project([bench(i, "w-gpu", v, timedelta(hours=i % 3) + (i // 3) * DAY) for i, v in enumerate(values)])
    found = rows(projection, group_by=["metric"], metric="latency_ms", since=T0, window_s=86400)
    assert [(r["window_start"], r["count"], r["mean"]) for r in found] == [
        (T0.isoformat(), 3, 10.0), ((T0 + DAY).isoformat(), 3, 12.0)]
    assert found[0]["change"] is None and found[1]["change"] == pytest.approx(0.2)


def test_since_alone_is_one_window_compared_with_the_same_length_before_it():
    projection = project([bench(i, "w-gpu", 10.0 if i < 3 else 8.0, i * DAY) for i in range(6)])
    found = aggregate.aggregate(projection.con.cursor(), AggregateRequest(
        group_by=["metric"], metric="latency_ms", since=T0 + 3 * DAY, until=T0 + 6 * DAY))["aggregate"]
    assert [(r["count"], r["mean"], r["window_start"]) for r in found] == [(3, 8.0, (T0 + 3 * DAY).isoformat())]
    assert found[0]["change"] == pytest.approx(-0.2)


def test_group_by_commit_and_run_and_the_kind_follows_the_keys():
    projection = project([
        Finished("r1", "r1-t", commit="aaa", branch="main", tests=[("t.py::a", "passed", 1.0)], metrics={"rss": 5.0}),
        Finished("r2", "r2-t", commit="bbb", branch="dev", tests=[("t.py::a", "failed", 1.0)], metrics={"rss": 7.0}),
    ])
    tests = aggregate.aggregate(projection.con.cursor(), AggregateRequest(group_by=["commit", "branch", "run"]))
    assert tests["kind"] == "tests"
    assert [(r["commit"], r["branch"], r["run"], r["pass_rate"]) for r in tests["aggregate"]] == [
        ("aaa", "main", "r1", 1.0), ("bbb", "dev", "r2", 0.0)]
    metrics = rows(projection, group_by=["commit", "metric"])
    assert [(r["commit"], r["metric"], r["mean"], r["series"]) for r in metrics] == [
        ("aaa", "rss", 5.0, "*:rss{commit=aaa}"), ("bbb", "rss", 7.0, "*:rss{commit=bbb}")]


def test_the_query_is_served_by_name_and_rejects_unknown_group_keys():
    projection = project([Finished("r1", "r1-t", tests=[("t.py::a", "passed", 1.0)])])
    reply = json.loads(queries.answer(projection.con, "aggregate", b'{"group_by": ["test"]}'))
    assert reply["kind"] == "tests" and reply["aggregate"][0]["test"] == "t.py::a" and reply["next_offset"] is None
    bad = json.loads(queries.answer(projection.con, "aggregate", b'{"group_by": ["colour"]}'))
    assert list(bad) == ["error"] and "group_by" in bad["error"]


def test_pages_join_up_to_the_whole_answer():
    projection = project([Finished("r1", "r1-t", tests=[(f"t.py::t{i:03d}", "passed", i) for i in range(30)])])
    whole = rows(projection, group_by=["test"])
    pages, offset = [], 0
    while offset is not None:
        reply = aggregate.aggregate(projection.con.cursor(), AggregateRequest(group_by=["test"], offset=offset, limit=7))
        pages += reply["aggregate"]
        offset = reply["next_offset"]
    assert pages == whole and len(whole) == 30


# --- property: the SQL agrees with a plain recomputation -------------------------------------------------

NODEIDS = ["t.py::a", "t.py::b", "u.py::c"]
observation = st.tuples(st.sampled_from(NODEIDS), st.sampled_from(["passed", "failed", "skipped", "error"]),
                        st.integers(0, 40).map(lambda n: n / 4))
task = st.builds(
    lambda worker, commit, model, hours, tests, latency: (worker, commit, model, hours, tests, latency),
    st.sampled_from(sorted(HARDWARE)), st.sampled_from(["", "c1", "c2"]), st.sampled_from(["bert", "gpt"]),
    st.integers(0, 24 * 6), st.lists(observation, max_size=4, unique_by=lambda o: o[0]), st.integers(1, 100),
)
KEYS = ["hardware", "worker", "commit", "test", "label.model"]


def naive_quantile(values, q):
    ordered = sorted(values)
    position = q * (len(ordered) - 1)
    low, high = math.floor(position), math.ceil(position)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def close(a, b):
    return (a is None and b is None) or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-9))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tasks=st.lists(task, max_size=12), keys=st.lists(st.sampled_from(KEYS), unique=True, max_size=3),
       windowed=st.booleans())
def test_test_aggregates_equal_a_plain_recomputation(tasks, keys, windowed):
    finished = [Finished(f"r{i}", f"r{i}-t", worker=w, commit=c, labels={"model": m}, at=timedelta(hours=h), tests=t)
                for i, (w, c, m, h, t, _) in enumerate(tasks)]
    projection = project(finished)
    window = 86400 if windowed else None
    found = rows(projection, group_by=keys, window_s=window)

    groups = defaultdict(list)
    for f in finished:
        for nodeid, outcome, duration in f.tests:
            key_values = {"hardware": "+".join(sorted(HARDWARE[f.worker])), "worker": f.worker, "commit": f.commit,
                          "test": nodeid, "label.model": f.labels["model"]}
            bucket = int((f.time + timedelta(seconds=1)).timestamp() // 86400) if windowed else 0  # result time
            groups[(*(key_values[k] for k in keys), bucket)].append((outcome, duration))
    expected = []
    previous = {}
    for group in sorted(groups):
        obs = groups[group]
        durations = [d for _, d in obs]
        ran = [o for o, _ in obs if o != "skipped"]
        mean = statistics.fmean(durations)
        before = previous.get(group[:-1])
        expected.append({
            "count": len(obs), "passed": sum(o == "passed" for o, _ in obs),
            "failed": sum(o == "failed" for o, _ in obs), "errors": sum(o == "error" for o, _ in obs),
            "pass_rate": (sum(o == "passed" for o in ran) / len(ran)) if ran else None,
            "mean": mean, "median": statistics.median(durations), "p95": naive_quantile(durations, 0.95),
            "stddev": statistics.stdev(durations) if len(durations) > 1 else None,
            "change": (mean - before) / abs(before) if before else None,
        })
        previous[group[:-1]] = mean
    assert len(found) == len(expected)
    for got, want in zip(found, expected, strict=True):
        for name, value in want.items():
            assert close(got[name], value) if isinstance(value, float) or value is None else got[name] == value, name
