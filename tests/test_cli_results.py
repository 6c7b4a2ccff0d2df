"""Results, flaky tests and CI reports end to end: `dtf up`, a suite with passes, failures, skips and
errors submitted from a git checkout with `--wait --junit`, and the JUnit file, `dtf results
--group-by`, `dtf flaky` and `dtf report` read back."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys

import pytest
from junitparser import JUnitXml

from test_end_to_end import Up

pytestmark = pytest.mark.slow

SUITE = '''
import pathlib
import pytest

COUNTER = pathlib.Path({counter!r})


@pytest.fixture
def broken():
    raise RuntimeError("fixture broke")


def test_passes():
    assert True


def test_passes_too():
    assert 1 + 1 == 2


def test_fails():
    assert 1 == 2, "one is not two"


@pytest.mark.skip(reason="not today")
def test_skipped():
    pass


def test_errors(broken):
    pass


def test_racy():
    runs = int(COUNTER.read_text()) if COUNTER.exists() else 0
    COUNTER.write_text(str(runs + 1))
    assert runs % 2 == 0, "fails every other run"
'''


def git(checkout, *args):
    subprocess.run(["git", "-C", str(checkout), "-c", "user.name=ci", "-c", "user.email=ci@example.com", *args],
                   check=True, capture_output=True)


@pytest.fixture
def checkout(tmp_path):
    """A git repository with the suite committed (its tests share a counter outside the workspace)."""
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "tests" / "test_suite.py").write_text(SUITE.format(counter=str(tmp_path / "racy-runs")))
    git(repo, "init", "-q", "-b", "main")
    git(repo, "add", ".")
    git(repo, "commit", "-q", "-m", "suite")
    return repo


@pytest.fixture
def up(tmp_path):
    system = Up(tmp_path / "d", tmp_path / "state", workers=1).start()
    yield system
    if system.process.poll() is None:
        assert system.stop() == 0


def test_a_suite_s_junit_results_flaky_tests_and_reports_read_back_right(up, checkout, tmp_path):
    junit = tmp_path / "junit.xml"
    first = up.dtf("submit", str(checkout / "tests"), "--wait", "--json", "--label", "model=bert",
                   "--junit", str(junit), check_json=True)
    assert first.returncode == 1, first.stderr
    run_id = json.loads(first.stdout)["run_id"]

    [suite] = list(JUnitXml.fromfile(str(junit)))
    assert (suite.tests, suite.failures, suite.errors, suite.skipped) == (6, 1, 1, 1)
    outcomes = {case.name: case for case in suite}
    assert outcomes["test_fails"].is_failure and "one is not two" in outcomes["test_fails"].result[0].text
    assert outcomes["test_errors"].is_error and outcomes["test_skipped"].is_skipped
    assert outcomes["test_racy"].is_passed and outcomes["test_passes"].is_passed

    # The same commit again: test_racy fails this time, so it is flaky on this commit and hardware.
    second = up.dtf("submit", str(checkout / "tests"), "--wait", "--json", "--label", "model=bert", check_json=True)
    assert second.returncode == 1
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    flaky = json.loads(up.dtf("flaky", "--json").stdout)["flaky"]
    assert [(f["test"], f["commit"], f["runs"], f["flips"]) for f in flaky] == [
        ("test_suite.py::test_racy", commit, 2, 1)]

    grouped = json.loads(up.dtf("results", "--group-by", "label.model,commit,branch", "--json").stdout)["results"]
    assert [(g["label.model"], g["commit"], g["branch"], g["count"], g["passed"], g["failed"], g["skipped"],
             g["errors"]) for g in grouped] == [("bert", commit, "main", 12, 5, 3, 2, 2)]
    per_test = up.dtf("results", "--group-by", "test", "--since", "1d", "--csv")
    rows = {row["test"]: row for row in csv.DictReader(io.StringIO(per_test.stdout))}
    assert rows["test_suite.py::test_racy"]["pass_rate"] == "0.5" and rows["test_suite.py::test_passes"]["count"] == "2"
    listed = json.loads(up.dtf("results", "--run", run_id, "--json").stdout)["results"]
    assert len(listed) == 6  # without --group-by: the per-test listing, as before

    page = tmp_path / "report.html"
    assert up.dtf("report", "--run", run_id, "--format", "html", "--out", str(page)).returncode == 0
    assert "<svg" in page.read_text() and "test_fails" in page.read_text()
    summary = tmp_path / "summary.md"
    in_actions = subprocess.run([sys.executable, "-m", "dtf", "report", "--format", "md"], capture_output=True,
                                text=True, env={**up.env, "GITHUB_STEP_SUMMARY": str(summary)}, timeout=120)
    assert "did not pass" in in_actions.stdout and in_actions.stdout == summary.read_text()
    assert json.loads(up.dtf("report", "--run", run_id, "--format", "json").stdout)["summary"]["failed"] == 1
