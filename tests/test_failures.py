"""Failures where CI looks: the worker's pytest plugin run on a real tiny suite records each failed
test's traceback, place, classname and output; the read model keeps them; the JUnit report carries
them with pytest's own classnames (checked against `pytest --junitxml` on the same suite and against
junit-10.xsd); `submit --wait`'s listing and GitHub annotations show them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import msgspec
import xmlschema
from hypothesis import given
from hypothesis import strategies as st

from dtf import events as ev
from dtf.cli import failures
from dtf.cli import github_annotations as annotations
from dtf.projections import report, report_junit, schema
from dtf.projections.artifacts import decode_tests
from dtf.projections.projection import Projection
from dtf.streams.bus import StoredMsg
from dtf.streams.topology import EVENTS
from dtf.workers import pytest_plugin
from dtf.workers.results import read_test_report
from result_history import Finished, messages, project
from test_report import ask

SCHEMA = xmlschema.XMLSchema(Path(__file__).with_name("junit-10.xsd"))

SUITE = {
    "tests/test_mod.py": '''
import sys
import pytest

def helper(x):
    assert x == 2, "x should be two"

class TestClass:
    def test_fails(self):
        print("out here")
        print("err here", file=sys.stderr)
        helper(1)

    @pytest.mark.parametrize("v", ["a::b", "c/d"])
    def test_param(self, v):
        assert v == "zz"

    def test_ok(self):
        pass

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_error(broken):
    pass

@pytest.mark.xfail
def test_expected():
    assert 0

def test_loud():
    print("x" * 100_000)
    raise ValueError("loud")
''',
    "tests/sub/test_deep.py": '''
def test_deep():
    value = {"a": 1}
    assert value["a"] == 2
''',
}


def run_suite(root: Path, prefix: str = "", *args: str) -> tuple[list[ev.TestOutcome], Path]:
    """The suite under `root` run by real pytest with dtf's plugin (and pytest's own --junitxml)."""
    for name, text in SUITE.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    out, junit = root / "report.jsonl", root / "pytest-junit.xml"
    env = {**os.environ, pytest_plugin.REPORT_ENV: str(out), pytest_plugin.PREFIX_ENV: prefix}
    subprocess.run([sys.executable, "-m", "pytest", *args, "-p", "dtf.workers.pytest_plugin", "-p", "no:cacheprovider",
                    "-q", f"--junitxml={junit}", "-o", "junit_family=xunit1"],
                   cwd=root, env=env, capture_output=True, check=False, timeout=120)
    return read_test_report(out), junit


def by_id(tests: list[ev.TestOutcome]) -> dict[str, ev.TestOutcome]:
    return {t.nodeid: t for t in tests}


def test_the_plugin_records_a_failed_test_s_traceback_place_classname_and_output(tmp_path):
    tests, _ = run_suite(tmp_path, "", "tests")
    found = by_id(tests)
    fails = found["tests/test_mod.py::TestClass::test_fails"]
    assert fails.outcome == "failed" and fails.message.startswith("AssertionError: x should be two")
    assert "def test_fails(self):" in fails.longrepr and "helper(1)" in fails.longrepr
    assert fails.short.startswith("tests/test_mod.py:12: in test_fails")
    assert "E   AssertionError: x should be two" in fails.short
    assert (fails.file, fails.line) == ("tests/test_mod.py", 6)  # the crash, in the helper
    assert fails.classname == "tests.test_mod.TestClass"
    assert (fails.stdout, fails.stderr) == ("out here\n", "err here\n")
    error = found["tests/test_mod.py::test_error"]
    assert error.outcome == "error" and "RuntimeError: setup broke" in error.longrepr
    assert (error.file, error.line, error.classname) == ("tests/test_mod.py", 23, "tests.test_mod")
    assert found["tests/sub/test_deep.py::test_deep"].classname == "tests.sub.test_deep"
    assert found["tests/test_mod.py::TestClass::test_param[a::b]"].classname == "tests.test_mod.TestClass"
    # What passed or was expected to fail carries nothing more than before.
    for nodeid in ("tests/test_mod.py::TestClass::test_ok", "tests/test_mod.py::test_expected"):
        quiet = found[nodeid]
        assert (quiet.longrepr, quiet.short, quiet.file, quiet.line, quiet.stdout) == ("", "", "", None, "")
    loud = found["tests/test_mod.py::test_loud"]
    assert len(loud.stdout) <= pytest_plugin.MAX_OUTPUT and "characters cut by dtf" in loud.stdout
    assert loud.stdout.startswith("xxx") and loud.stdout.rstrip().endswith("xxx")


def test_the_source_prefix_makes_names_read_as_from_the_submitter_s_directory(tmp_path):
    """`dtf submit tests/` ships tests/ alone: pytest there sees `test_mod.py`, the submitter `tests/`."""
    tests, _ = run_suite(tmp_path, "", "tests")
    shipped = tmp_path / "tests"
    out = tmp_path / "shipped.jsonl"
    env = {**os.environ, pytest_plugin.REPORT_ENV: str(out), pytest_plugin.PREFIX_ENV: "tests"}
    subprocess.run([sys.executable, "-m", "pytest", "test_mod.py", "-p", "dtf.workers.pytest_plugin", "-q",
                    "-p", "no:cacheprovider"], cwd=shipped, env=env, capture_output=True, timeout=120, check=False)
    fails = by_id(read_test_report(out))["test_mod.py::TestClass::test_fails"]
    assert (fails.file, fails.classname) == ("tests/test_mod.py", "tests.test_mod.TestClass")
    assert fails.file == by_id(tests)["tests/test_mod.py::TestClass::test_fails"].file


def cap_examples() -> st.SearchStrategy:
    return st.tuples(st.text(max_size=3000), st.integers(min_value=100, max_value=2000))


@given(cap_examples())
def test_capping_keeps_short_texts_and_cuts_long_ones_to_the_limit_with_a_marker(example):
    text, limit = example
    capped = pytest_plugin.cap(text, limit)
    if len(text) <= limit:
        assert capped == text
    else:
        assert len(capped) <= limit and "characters cut by dtf" in capped
        assert text.startswith(capped[:10]) and text.endswith(capped[-10:])


def projected(tests: list[ev.TestOutcome], run_id: str = "r1"):
    """A read model holding one test task whose result carries `tests`."""
    task = Finished(run_id, f"{run_id}-t", name="tests", tests=[(t.nodeid, t.outcome, t.duration_s) for t in tests])
    stored = messages([task])
    last = stored[-1]
    result = msgspec.structs.replace(ev.decode(last.data), tests=tests)
    stored[-1] = StoredMsg(EVENTS, last.seq, last.subject, ev.encode(result))
    projection = Projection.open(":memory:")
    projection.apply_batch(stored)
    return projection, run_id


def junit_of(projection, run_id: str, locations: bool = True) -> bytes:
    doc = report.document(run_id, ask(projection, "tasks", {"run_id": run_id}),
                          ask(projection, "results", {"run_id": run_id}), [], [])
    return report_junit.to_junit(doc, locations=locations)


def cases(xml: bytes) -> dict[tuple[str, str], ET.Element]:
    root = ET.fromstring(xml)
    return {(c.get("classname"), c.get("name")): c for c in root.iter("testcase")}


def test_the_junit_report_carries_tracebacks_output_and_pytest_s_own_classnames(tmp_path):
    tests, pytest_junit = run_suite(tmp_path, "", "tests")
    projection, run_id = projected(tests)
    ours = cases(junit_of(projection, run_id))
    theirs = cases(pytest_junit.read_bytes())
    assert set(ours) == set(theirs)  # pytest's classnames and names, test for test
    fails = ours[("tests.test_mod.TestClass", "test_fails")]
    [failure] = fails.findall("failure")
    assert failure.get("type") == "AssertionError"
    assert failure.get("message").startswith("AssertionError: x should be two")
    assert "def test_fails(self):" in failure.text and "helper(1)" in failure.text
    assert (fails.findtext("system-out"), fails.findtext("system-err")) == ("out here\n", "err here\n")
    assert (fails.get("file"), fails.get("line")) == ("tests/test_mod.py", "6")
    assert theirs[("tests.test_mod.TestClass", "test_fails")].get("file") == "tests/test_mod.py"
    [error] = ours[("tests.test_mod", "test_error")].findall("error")
    assert error.get("type") == "RuntimeError" and "setup broke" in error.text
    # Valid against Jenkins' schema, but for the file= and line= it does not declare.
    SCHEMA.validate(junit_of(projection, run_id, locations=False).decode())
    stripped = ET.fromstring(junit_of(projection, run_id))
    for case in stripped.iter("testcase"):
        case.attrib.pop("file", None)
        case.attrib.pop("line", None)
    assert ET.tostring(stripped) == ET.tostring(ET.fromstring(junit_of(projection, run_id, locations=False)))


def test_an_older_read_model_gets_the_new_columns_and_equals_a_rebuilt_one(tmp_path):
    import duckdb

    old_columns = [c for c in schema.TEST_RESULTS.columns if c[0] not in schema.TEST_RESULTS.added]
    old = schema.Table("test_results", tuple(old_columns))
    history = [Finished("r1", "r1-t", tests=[("t.py::a", "failed", 1.0), ("t.py::b", "passed", 0.5)])]
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(old.ddl())
        before = project(history).con.execute(
            f"SELECT {', '.join(old.column_names)} FROM test_results ORDER BY ALL").fetchall()
        con.executemany(f"INSERT INTO test_results VALUES ({', '.join('?' * len(old_columns))})", before)
        schema.create(con)
        migrated = con.execute("SELECT * FROM test_results ORDER BY ALL").fetchall()
    assert migrated == schema.contents(project(history).con)["test_results"]


def failure(**fields) -> dict:
    return {"task_id": "t", "nodeid": "tests/test_a.py::test_x", "outcome": "failed", "file": "tests/test_a.py",
            "line": 3, "message": "AssertionError: assert 1 == 2", "short": "", **fields}


def test_the_listing_names_each_failure_s_place_and_traceback_head_and_caps_both():
    short = "\n".join(f"line {i}" for i in range(40))
    listed = failures.lines([failure(short=short)] + [failure(nodeid=f"t.py::f{i}", file="") for i in range(25)])
    assert listed[0] == "26 failed tests:"
    assert listed[1] == "FAILED tests/test_a.py::test_x (tests/test_a.py:3)"
    assert listed[2] == "    line 0" and "    line 14" in listed and "    line 15" not in listed
    assert listed[17].startswith("    ... (25 more lines")
    assert "FAILED t.py::f0" in listed and "FAILED t.py::f19" not in listed
    assert listed[-1] == "... and 6 more"


# The runner's unescaping of workflow commands (actions/runner ActionCommand.Unescape), in its order.
def unescape_data(text: str) -> str:
    return text.replace("%0D", "\r").replace("%0A", "\n").replace("%25", "%")


def unescape_property(text: str) -> str:
    return (text.replace("%0D", "\r").replace("%0A", "\n").replace("%3A", ":").replace("%2C", ",")
            .replace("%25", "%"))


@given(st.text(), st.text(min_size=1), st.integers(min_value=1))
def test_annotations_escape_so_the_runner_reads_back_exactly_what_failed(message, nodeid, line):
    command = annotations.error_line(failure(nodeid=nodeid, message=message, file="a,b:c%/t.py", line=line))
    assert "\n" not in command and "\r" not in command
    head, data = command.removeprefix("::error ").split("::", 1)
    properties = dict(p.split("=", 1) for p in head.split(","))
    assert {k: unescape_property(v) for k, v in properties.items()} == {
        "file": "a,b:c%/t.py", "line": str(line), "title": nodeid}
    assert unescape_data(data) == (message or "failed")[:annotations.MAX_MESSAGE]


def test_annotations_are_printed_in_github_actions_or_when_asked(monkeypatch):
    monkeypatch.setenv("GITHUB_ACTIONS", "true")
    assert annotations.wanted("auto") and not annotations.wanted("none")
    monkeypatch.delenv("GITHUB_ACTIONS")
    assert annotations.wanted("github") and not annotations.wanted("auto")


outcomes = st.builds(
    ev.TestOutcome, nodeid=st.text(min_size=1), outcome=st.sampled_from(["passed", "failed", "skipped", "error"]),
    duration_s=st.floats(min_value=0, max_value=1e6), message=st.text(), longrepr=st.text(), short=st.text(),
    file=st.text(), line=st.none() | st.integers(min_value=1, max_value=2**31), classname=st.text(),
    stdout=st.text(), stderr=st.text())


@given(st.lists(outcomes, max_size=5))
def test_a_result_s_failure_details_survive_the_wire_and_the_artifacts_store(tests):
    result = ev.ResultReported(run_id="r", task_id="t", attempt=1, worker_id="w", outcome="failed", tests=tests)
    assert ev.decode(ev.encode(result)).tests == tests
    stored = msgspec.json.encode(tests)  # what a worker puts under tests_ref for a big list
    assert decode_tests(stored) == tests


def test_a_result_from_before_the_failure_details_decodes_with_their_defaults():
    old = (b'{"type":"ResultReported","id":"x","time":"2026-01-01T00:00:00Z","v":1,"run_id":"r","task_id":"t",'
           b'"attempt":1,"worker_id":"w","outcome":"failed","tests":[{"nodeid":"a.py::b","outcome":"failed",'
           b'"message":"assert 0"}]}')
    [test] = ev.decode(old).tests
    assert (test.message, test.longrepr, test.short, test.file, test.line, test.classname, test.stdout) == (
        "assert 0", "", "", "", None, "", "")
