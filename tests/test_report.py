"""Run reports built from a real read model's query answers: JUnit XML read back by junitparser and
valid against Jenkins' junit-10.xsd, Markdown for GitHub step summaries, self-contained HTML."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import xmlschema
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from junitparser import JUnitXml

from dtf.cli import commands_results
from dtf.projections import queries, report, report_html, report_junit
from result_history import Finished, project

SCHEMA = xmlschema.XMLSchema(Path(__file__).with_name("junit-10.xsd"))
RUN = [
    Finished("r1", "r1-unit", worker="w-cpu", name="tests/test_unit.py", tests=[
        ("tests/test_unit.py::test_ok", "passed", 0.5), ("tests/test_unit.py::TestMaths::test_add[1-2]", "failed", 1.5),
        ("tests/test_unit.py::test_later", "skipped", 0.0), ("tests/test_unit.py::test_fixture", "error", 0.25)]),
    Finished("r1", "r1-more", worker="w-gpu", name="tests/test_more.py", tests=[
        ("tests/test_more.py::test_a", "passed", 0.1), ("tests/test_more.py::test_b", "passed", 0.2)]),
    Finished("r1", "r1-bench", worker="w-gpu", type="benchmark", name="infer", labels={"model": "bert"},
             metrics={"latency_ms": 12.5}),
    Finished("r1", "r1-cmd", worker="w-cpu", type="command", name="make lint", outcome="failed"),
]


def ask(projection, name, request):
    return json.loads(queries.answer(projection.con, name, json.dumps(request).encode()))[name]


def document(finished, anomalies=None):
    """The report as `dtf report` builds it: from the query answers the projector gives."""
    projection = project(finished)
    run_id = finished[0].run_id
    return report.document(
        run_id, ask(projection, "tasks", {"run_id": run_id}), ask(projection, "results", {"run_id": run_id}),
        ask(projection, "aggregate", {"run_id": run_id, "kind": "metrics", "group_by": report.METRIC_GROUPS}),
        anomalies)


def test_the_junit_xml_of_a_run_reads_back_with_its_counts_and_is_valid_against_the_schema():
    xml = report_junit.to_junit(document(RUN))
    SCHEMA.validate(xml.decode())
    parsed = JUnitXml.fromstring(xml.decode())
    suites = {suite.name: suite for suite in parsed}
    unit = suites["tests/test_unit.py"]
    assert (unit.tests, unit.failures, unit.errors, unit.skipped) == (4, 1, 1, 1)
    assert unit.hostname == "w-cpu"
    cases = {case.name: case for case in unit}
    assert cases["test_add[1-2]"].classname == "tests.test_unit.TestMaths"
    assert cases["test_add[1-2]"].is_failure and cases["test_add[1-2]"].result[0].message == "assert 1 == 2"
    assert cases["test_fixture"].is_error and cases["test_later"].is_skipped and cases["test_ok"].is_passed
    assert cases["test_add[1-2]"].time == 1.5
    assert (suites["tests/test_more.py"].tests, suites["tests/test_more.py"].failures) == (2, 0)
    # Tasks without tests are one testcase each: the benchmark passed, the command failed.
    [bench] = list(suites["infer"])
    assert bench.is_passed and {p.name: p.value for p in suites["infer"].properties()}[
        "metric.infer:latency_ms{model=bert}@cpu+cuda"] == "12.5"
    [lint] = list(suites["make lint"])
    assert lint.is_failure
    totals = (sum(s.tests for s in parsed), sum(s.failures for s in parsed), sum(s.errors for s in parsed))
    assert totals == (8, 2, 1)


def test_the_report_counts_like_submit_wait():
    doc = document(RUN)
    summary = doc["summary"]
    assert (summary["passed"], summary["failed"], summary["skipped"], summary["errors"]) == (4, 2, 1, 1)
    assert summary["tasks"] == 4 and not doc["ok"] and summary["regressions"] is None
    assert [m["series"] for m in doc["metrics"]] == ["infer:latency_ms{model=bert}@cpu+cuda"]


def test_only_the_last_attempt_s_tests_count():
    rows = [{"task_id": "t", "attempt": a, "nodeid": "x::y", "outcome": o, "duration_s": 1.0, "message": ""}
            for a, o in ((1, "error"), (2, "passed"))]
    task = {"task_id": "t", "state": "passed", "duration_s": 1.0}
    doc = report.document("r", [task], rows, [], [])
    assert [t["outcome"] for t in doc["tasks"][0]["tests"]] == ["passed"] and doc["ok"]


unicode_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=200)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=unicode_text, nodeid=unicode_text.filter(str.strip), name=unicode_text)
def test_any_test_output_still_makes_valid_junit(message, nodeid, name):
    tests = [{"task_id": "t", "attempt": 1, "nodeid": nodeid, "outcome": "failed", "duration_s": 0.1, "message": message}]
    task = {"task_id": "t", "name": name, "type": "test", "state": "failed", "worker_id": "w", "attempts": 1,
            "duration_s": 0.1, "reason": message, "finished_at": None}
    xml = report_junit.to_junit(report.document("r", [task], tests, [], None))
    SCHEMA.validate(xml.decode())
    [suite] = list(JUnitXml.fromstring(xml.decode()))
    assert (suite.tests, suite.failures) == (1, 1)


def test_markdown_names_the_failures_and_regressions():
    regression = {"kind": "regression", "series": "infer:latency_ms{model=bert}@cpu+cuda", "run_id": "r1",
                  "before": 10.0, "after": 12.5}
    md = report.to_markdown(document(RUN, anomalies=[regression, {"kind": "anomaly", "series": "x", "run_id": "r1"}]))
    assert "dtf run `r1` did not pass" in md
    assert "| 4 | 4 | 2 | 1 | 1 |" in md
    assert "tests/test_unit.py::TestMaths::test_add[1-2]" in md and "make lint" in md
    assert "**1 regression(s)**" in md and "before=10.0, after=12.5" in md


def test_markdown_is_appended_to_the_github_step_summary(tmp_path, monkeypatch):
    summary = tmp_path / "summary.md"
    summary.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(summary))
    commands_results.step_summary(document(RUN))
    text = summary.read_text()
    assert text.startswith("earlier step\n") and "dtf run `r1`" in text


def test_the_html_page_is_self_contained_with_inline_svg_charts_and_escaped_text():
    hostile = Finished("r9", "r9-t", name="<script>alert(1)</script>",
                       tests=[("t.py::test_<b>", "failed", 2.0)], message="<img src=x onerror=alert(1)>")
    page = report_html.to_html(document([hostile, *[Finished("r9", f"r9-{i}", tests=[(f"t.py::s{i}", "passed", i)])
                                                     for i in range(3)]]))
    assert page.count("<svg") >= 2 and "<script" not in page and "<img" not in page
    assert "&lt;script&gt;" in page and "&lt;img src=x" in page
    assert "http" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")


def test_json_is_the_whole_document():
    doc = document(RUN)
    assert json.loads(report.to_json(doc)) == json.loads(json.dumps(doc))


@pytest.mark.parametrize("found, flag, code", [
    ([], True, 0), ([{"kind": "regression", "series": "s"}], True, 4), ([{"kind": "anomaly"}], True, 0),
    ([{"kind": "regression", "series": "s"}], False, 0),
])
def test_fail_on_regression_exits_4_only_for_a_regression(found, flag, code):
    assert commands_results.regression_exit({"anomalies": found}, flag) == code


def test_fail_on_regression_without_a_detector_is_an_error():
    with pytest.raises(commands_results.CliError, match="no detector"):
        commands_results.regression_exit({"anomalies": None}, True)


task_outcomes = st.lists(st.sampled_from(["passed", "failed", "skipped", "error"]), max_size=4)
task_states = st.sampled_from(["passed", "failed", "error", "timed_out", "cancelled", "running", "pending"])


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(task_states, task_outcomes), max_size=6))
def test_the_junit_totals_are_the_report_s_counts_and_nothing_that_went_wrong_reads_green(tasks):
    task_rows, results = [], []
    for i, (state, outcomes) in enumerate(tasks):
        task_rows.append({"task_id": f"t{i}", "name": f"task {i}", "type": "test", "state": state, "worker_id": "w",
                          "attempts": 1, "duration_s": 1.0, "reason": "", "finished_at": None})
        results += [{"task_id": f"t{i}", "attempt": 1, "nodeid": f"f.py::t{j}", "outcome": o, "duration_s": 0.1,
                     "message": ""} for j, o in enumerate(outcomes)]
    doc = report.document("r", task_rows, results, [], [])
    parsed = JUnitXml.fromstring(report_junit.to_junit(doc).decode())
    s = doc["summary"]
    assert sum(suite.tests for suite in parsed) == s["passed"] + s["failed"] + s["skipped"] + s["errors"]
    assert (sum(suite.failures for suite in parsed), sum(suite.errors for suite in parsed),
            sum(suite.skipped for suite in parsed)) == (s["failed"], s["errors"], s["skipped"])
    settled = [state for state, _ in tasks if state not in ("running", "pending")]
    if any(state != "passed" for state in settled):
        assert s["failed"] + s["errors"] > 0
