"""Results, flaky tests and CI reports end to end: `dtf up`, a suite with passes, failures, skips and
errors submitted from a git checkout with `--wait --junit`, and the JUnit file, `dtf results
--group-by`, `dtf flaky` and `dtf report` read back."""

from __future__ import annotations

import csv
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import click
import polars as pl
import pytest
from junitparser import JUnitXml

from dtf.cli.commands_results import parse_duration, parse_group_by, parse_time
from dtf.cli.submit import git_source
from test_end_to_end import Up

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


@pytest.mark.slow
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
    second = up.dtf("submit", str(checkout / "tests"), "--json", "--label", "model=bert", check_json=True)
    waited = up.dtf("wait", json.loads(second.stdout)["run_id"], "--json", "--junit", str(junit))
    assert waited.returncode == 1, waited.stderr
    [suite] = list(JUnitXml.fromfile(str(junit)))
    assert [case.name for case in suite if case.is_failure] == ["test_fails", "test_racy"]
    commit = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    flaky = json.loads(up.dtf("flaky", "--json").stdout)["flaky"]
    assert [(f["test"], f["commit"], f["runs"], f["flips"]) for f in flaky] == [
        ("tests/test_suite.py::test_racy", commit, 2, 1)]

    grouped = json.loads(up.dtf("results", "--group-by", "label.model,commit,branch", "--json").stdout)["results"]
    assert [(g["label.model"], g["commit"], g["branch"], g["count"], g["passed"], g["failed"], g["skipped"],
             g["errors"]) for g in grouped] == [("bert", commit, "main", 12, 5, 3, 2, 2)]
    per_test = up.dtf("results", "--group-by", "test", "--since", "1d", "--csv")
    rows = {row["test"]: row for row in csv.DictReader(io.StringIO(per_test.stdout))}
    assert rows["tests/test_suite.py::test_racy"]["pass_rate"] == "0.5"
    assert rows["tests/test_suite.py::test_passes"]["count"] == "2"
    parquet = tmp_path / "by-test.parquet"
    assert up.dtf("results", "--group-by", "test", "--parquet", str(parquet)).returncode == 0
    assert pl.read_parquet(parquet).sort("test")["passed"].to_list() == [0, 0, 2, 2, 1, 0]
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


NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("text, expected", [
    ("7d", NOW - timedelta(days=7)), ("12h", NOW - timedelta(hours=12)), ("2w", NOW - timedelta(weeks=2)),
    ("2026-01-01T00:00:00Z", datetime(2026, 1, 1, tzinfo=UTC)),
    ("2026-01-01T01:00:00+01:00", datetime(2026, 1, 1, tzinfo=UTC)),
    ("2026-01-01", datetime(2026, 1, 1, tzinfo=UTC)),
])
def test_since_takes_an_iso_time_or_a_duration_back_from_now(text, expected):
    assert parse_time(text, NOW, "--since") == expected


@pytest.mark.parametrize("text", ["yesterday", "7 days", "-3d", ""])
def test_a_time_that_is_neither_is_a_usage_error(text):
    with pytest.raises(click.BadParameter):
        parse_time(text, NOW, "--since")


def test_windows_are_durations():
    assert parse_duration("1d", "--window") == 86400 and parse_duration("90s", "--window") == 90
    with pytest.raises(click.BadParameter):
        parse_duration("daily", "--window")


def test_group_keys_are_comma_separated_and_repeatable_and_unknown_ones_are_refused():
    assert parse_group_by(("hardware,label.model", "commit")) == ["hardware", "label.model", "commit"]
    for bad in ("colour", "label.", 'label.a"b'):
        with pytest.raises(click.BadParameter, match="group by"):
            parse_group_by((bad,))


def test_submit_knows_the_commit_and_branch_of_a_checkout_and_nothing_outside_one(checkout, tmp_path, monkeypatch):
    head = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    assert git_source(checkout / "tests" / "test_suite.py") == (head, "main")
    git(checkout, "checkout", "-q", "--detach")
    monkeypatch.setenv("GITHUB_HEAD_REF", "feature-x")  # what Actions says of a detached pull request
    assert git_source(checkout) == (head, "feature-x")
    outside = tmp_path / "plain"
    outside.mkdir()
    assert git_source(outside) == ("", "")
