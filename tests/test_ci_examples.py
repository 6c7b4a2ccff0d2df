"""The CI examples in docs/ci/ run as written: their YAML parses, every `dtf` command in them is a real
dtf command with real options (parsed by the CLI itself), and their test jobs' scripts run against a
real `dtf up` (auth on) holding only submitter credentials, as a CI runner would run them: the job's
exit code, its JUnit report and its GitHub annotations are what CI shows."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from junitparser import JUnitXml

from cli_lines import dtf_invocations, resolve_dtf_command
from auth_up import dtf_up

ROOT = Path(__file__).resolve().parents[1]
GITHUB = ROOT / "docs" / "ci" / "github-actions.yml"
GITLAB = ROOT / "docs" / "ci" / "gitlab-ci.yml"
BIN = Path(sys.executable).parent

SUITE = """\
def test_passes():
    assert 1 + 1 == 2


def test_fails():
    assert "one" == "two"
"""


def github_steps(job: str) -> dict[str, str]:
    """The shell scripts of a GitHub Actions job, by step name."""
    steps = yaml.safe_load(GITHUB.read_text())["jobs"][job]["steps"]
    return {step.get("name", step.get("uses", "")): step["run"] for step in steps if "run" in step}


def gitlab_script(job: str) -> list[str]:
    return yaml.safe_load(GITLAB.read_text())[job]["script"]


def every_script() -> list[str]:
    scripts = [script for job in yaml.safe_load(GITHUB.read_text())["jobs"] for script in github_steps(job).values()]
    gitlab = yaml.safe_load(GITLAB.read_text())
    scripts += ["\n".join(job["script"]) for job in gitlab.values() if isinstance(job, dict) and "script" in job]
    return scripts


def test_every_dtf_command_in_the_ci_examples_is_a_real_dtf_command():
    commands = [argv for script in every_script() for argv in dtf_invocations(script)]
    assert {argv[1] for argv in commands} >= {"submit", "worker"}
    for argv in commands:
        resolve_dtf_command(argv)  # raises click's UsageError on an unknown command, option or value


# --- the jobs, run as written against a fleet -------------------------------------------------------------


@pytest.fixture
def fleet(tmp_path):
    """`dtf up` with auth on, and a submitter's credentials as a CI secret would hold them."""
    with dtf_up(tmp_path, workers=2, env={"PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}) as up:
        url, admin, env = up.url, str(up.admin), up.env
        creds = tmp_path / "ci.creds"
        added = subprocess.run([sys.executable, "-m", "dtf", "creds", "add", "--role", "submitter", "--name",
                                "ci-project", "--out", str(creds)], env={**env, "DTF_CREDS": admin},
                               capture_output=True, text=True, timeout=120, cwd=tmp_path)
        assert added.returncode == 0, added.stderr
        yield {**env, "DTF_NATS_URL": url, "DTF_CREDS": str(creds)}


@pytest.fixture
def checkout(tmp_path) -> Path:
    """A project as CI checks it out: a git repository with a tests/ folder."""
    repo = tmp_path / "project"
    (repo / "tests").mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[project]\nname = "project"\nversion = "0"\n')
    (repo / "tests" / "test_suite.py").write_text(SUITE)
    for args in (["init", "-q", "-b", "main"], ["add", "."],
                 ["-c", "user.name=ci", "-c", "user.email=ci@example.com", "commit", "-qm", "suite"]):
        subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)
    return repo


def run_job(script: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, cwd=cwd, capture_output=True,
                          text=True, timeout=600)


def assert_junit_shows_the_failure(junit: Path, job: subprocess.CompletedProcess) -> None:
    outcomes = {case.name: case for suite in JUnitXml.fromfile(str(junit)) for case in suite}
    assert "test_passes" in outcomes, (junit.read_text(), job.stdout, job.stderr)  # what the job said, if not
    assert outcomes["test_passes"].is_passed
    assert outcomes["test_fails"].is_failure and "'one' == 'two'" in outcomes["test_fails"].result[0].text


@pytest.mark.slow
def test_the_gitlab_job_runs_as_written_with_submitter_credentials(fleet, checkout):
    # `pip install dtf` is the runner's setup; dtf is installed here already.
    script = "\n".join(line for line in gitlab_script("fleet-tests") if not line.startswith("python -m pip"))
    env = {**fleet, "CI_COMMIT_SHA": "0" * 40, "CI_COMMIT_REF_NAME": "main"}
    done = run_job(script, env, checkout)
    assert done.returncode == 1, done.stdout + done.stderr  # the suite has a failing test: the job fails
    assert "tests/test_suite.py::test_fails" in done.stdout + done.stderr
    assert_junit_shows_the_failure(checkout / "junit.xml", done)


@pytest.mark.slow
def test_the_github_job_annotates_the_failed_test_with_submitter_credentials(fleet, checkout):
    env = {**fleet, "GITHUB_ACTIONS": "true", "GITHUB_SHA": "1" * 40, "GITHUB_REF_NAME": "main"}
    done = run_job(github_steps("tests")["Tests on the fleet"], env, checkout)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "::error file=tests/test_suite.py,line=6" in done.stdout + done.stderr
    assert_junit_shows_the_failure(checkout / "junit.xml", done)
