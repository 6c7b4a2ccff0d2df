"""Real projects on a running system (`dtf up`, real workers): a src-layout project submitted by its
tests folder runs as `pytest` runs it in the project (its configuration, its root conftest.py, the
same node ids), whole or split; and test code that does not import, or bad pytest arguments, are
the tasks' own errors: not retried, and no worker quarantined for them."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest
from test_end_to_end import EXAMPLES, ROOT, Up

from dtf import events as ev
from dtf import subjects
from dtf.cli.collection import parse_collection
from dtf.streams import bus, topology

pytestmark = pytest.mark.slow

SRC_LAYOUT = EXAMPLES / "srclayout"


async def _events(url: str, filters: list[str]) -> list[ev.Event]:
    nc = await bus.connect(url, name="test")
    try:
        return [ev.decode(m.data) async for m in bus.read(nc.jetstream(), topology.EVENTS, filters)]
    finally:
        await nc.close()


def reported_nodeids(system: Up, run_id: str) -> list[str]:
    """Every test the run's workers reported, read from the event log (no projector in between)."""
    events = asyncio.run(_events(system.url, [subjects.run_all(run_id)]))
    return sorted(t.nodeid for e in events if isinstance(e, ev.ResultReported) for t in e.tests)


def submit(system: Up, *args: str) -> tuple[dict, str]:
    done = system.dtf("submit", "--wait", "--json", *args, check_json=True)
    return {**json.loads(done.stdout), "returncode": done.returncode}, done.stderr


@pytest.fixture
def one_worker(tmp_path):
    system = Up(tmp_path / "d", tmp_path / "state", workers=1).start()
    yield system
    assert system.stop() == 0


def test_a_src_layout_project_submitted_by_its_tests_folder_runs_as_pytest_runs_it_whole_or_split(one_worker):
    local = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                            str(SRC_LAYOUT / "tests")], capture_output=True, text=True, cwd=ROOT, check=True)
    expected = sorted(parse_collection(local.stdout))
    assert len(expected) == 3 and all(n.startswith("tests/test_shapes.py::") for n in expected)

    whole, said = submit(one_worker, str(SRC_LAYOUT / "tests"))
    assert whole["returncode"] == 0, said
    assert f"project {SRC_LAYOUT} (pytest configuration pyproject.toml)" in said
    assert whole["summary"] == {"passed": 3, "failed": 0, "skipped": 0, "errors": 0}
    assert reported_nodeids(one_worker, whole["run_id"]) == expected

    split, said = submit(one_worker, str(SRC_LAYOUT / "tests"), "--split", "2", "--group", "test")
    assert split["returncode"] == 0, said
    assert len(split["tasks"]) > 1 and reported_nodeids(one_worker, split["run_id"]) == expected


def write_project(root, files: dict[str, str]) -> None:
    for name, body in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(body))


def test_broken_test_files_and_bad_arguments_are_the_tasks_errors_never_retried_and_quarantine_no_one(
        one_worker, tmp_path):
    proj = tmp_path / "proj"
    write_project(proj, {
        "pyproject.toml": "[tool.pytest.ini_options]\nxfail_strict = true\n",
        **{f"tests/test_broken_{i}.py": "def test_broken(:\n" for i in range(3)},  # quarantine_after is 3
        "tests/test_fine.py": "def test_fine():\n    pass\n",
        "tests/test_other.py": "def test_other():\n    pass\n",
    })
    report, said = submit(one_worker, str(proj / "tests"), "--retries", "2", "--", "-k", "fine")
    assert report["returncode"] == 1, said
    by_name = {t["name"]: t for t in report["tasks"]}
    for i in range(3):
        broken = by_name[f"tests/test_broken_{i}.py"]
        assert (broken["state"], broken["attempts"]) == ("error", 1)
        assert broken["reason"] == f"tests/test_broken_{i}.py: collection error: SyntaxError: invalid syntax"
    assert (by_name["tests/test_fine.py"]["state"], by_name["tests/test_fine.py"]["tests"]["passed"]) == ("passed", 1)
    other = by_name["tests/test_other.py"]  # -k selected nothing in it
    assert other["state"] == "passed" and not any(other["tests"].values())
    assert "no tests selected" in other["reason"]

    bad_args, said = submit(one_worker, str(proj / "tests" / "test_fine.py"), "--retries", "2", "--",
                            "--no-such-option")
    [task] = bad_args["tasks"]
    assert (bad_args["returncode"], task["state"], task["attempts"]) == (1, "error", 1)
    assert "unrecognized arguments: --no-such-option" in task["reason"]

    # Four errors in a row on the one worker: had they counted, it would have been quarantined before
    # the second run's task could be assigned to it.
    verdicts = asyncio.run(_events(one_worker.url, [subjects.worker("*", "quarantined")]))
    assert verdicts == []


def test_a_project_without_configuration_ignores_the_one_around_the_workers_directory(tmp_path, tmp_path_factory):
    """Workers started with `dtf up --data-dir .dtf` inside a checkout keep their copies of projects
    under that checkout; its pytest configuration must not reach a project that has none."""
    host = tmp_path / "host"
    write_project(host, {"pytest.ini": "[pytest]\naddopts = --no-such-option\n"})
    proj = tmp_path_factory.mktemp("noconfig")
    write_project(proj, {"setup.py": "", "tests/test_a.py": "def test_a():\n    pass\n"})
    system = Up(host / "d", tmp_path / "state", workers=1).start()
    try:
        report, said = submit(system, str(proj / "tests"))
        assert report["returncode"] == 0, (said, report)
        assert reported_nodeids(system, report["run_id"]) == ["tests/test_a.py::test_a"]
    finally:
        assert system.stop() == 0
