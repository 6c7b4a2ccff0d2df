"""`dtf submit tests/ --wait` from a project's root, on a real `dtf up` (nats-server, coordinator,
projector, workers): the failing test is listed with its file:line and traceback, annotated for
GitHub, in --json, and in the --junit file with the classname the project's own pytest gives."""

from __future__ import annotations

import json
import subprocess
import sys
import xml.etree.ElementTree as ET

import pytest

from test_end_to_end import Up

pytestmark = pytest.mark.slow

FAILING = '''
def add(a, b):
    return a - b


class TestMaths:
    def test_add(self):
        assert add(1, 2) == 3

    def test_ok(self):
        assert add(2, 0) == 2
'''


@pytest.fixture
def up(tmp_path):
    system = Up(tmp_path / "d", tmp_path / "state", workers=1).start()
    yield system
    if system.process.poll() is None:
        assert system.stop() == 0


def submit(up: Up, project, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dtf", "submit", "tests", "--wait", *args], cwd=project,
                          env={**up.env, "GITHUB_ACTIONS": "true"}, capture_output=True, text=True, timeout=180)


def test_submit_wait_lists_the_failing_test_with_its_place_and_traceback(up, tmp_path):
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "tests" / "test_maths.py").write_text(FAILING)

    done = submit(up, project, "--junit", str(tmp_path / "junit.xml"))
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    out = done.stdout
    assert "1 failed test:" in out
    assert "FAILED test_maths.py::TestMaths::test_add (tests/test_maths.py:8)" in out
    assert "    test_maths.py:8: in test_add" in out and "E   assert -1 == 3" in out
    assert ("::error file=tests/test_maths.py,line=8,title=test_maths.py%3A%3ATestMaths%3A%3Atest_add"
            "::assert -1 == 3") in out

    cases = {c.get("name"): c for c in ET.parse(tmp_path / "junit.xml").iter("testcase")}
    assert cases["test_add"].get("classname") == "tests.test_maths.TestMaths"
    assert "def test_add(self):" in cases["test_add"].find("failure").text

    done = submit(up, project, "--json", "--annotations", "none")
    report = json.loads(done.stdout)
    [failure] = report["failures"]
    assert (failure["nodeid"], failure["file"], failure["line"]) == (
        "test_maths.py::TestMaths::test_add", "tests/test_maths.py", 8)
    assert "E   assert -1 == 3" in failure["short"] and "::error" not in done.stderr
