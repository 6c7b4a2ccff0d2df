"""A project's declared dependencies reach a real worker: `dtf submit` (through `dtf up`) ships an
EnvSpec, the worker builds the environment with uv once, runs the tests in it (a package the worker's
own Python lacks imports; dtf does not) and reuses it for the next run; `--env system` keeps the
worker's own Python; a requirement that cannot be installed is the task's error, never retried."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from test_end_to_end import Up
from test_project_end_to_end import _events, submit, write_project

from dtf import events as ev
from dtf import subjects

pytestmark = pytest.mark.slow

LOCAL_INDEX = Path("/opt/pypi/simple")
"""This machine's offline PyPI mirror; elsewhere uv uses its own (or UV_INDEX_URL's) index."""
TESTS = {
    "pyproject.toml": "[tool.pytest.ini_options]\n",  # the project's root, where requirements.txt is
    "tests/test_dep.py": "def test_the_declared_package_imports():\n"
                         "    from text_unidecode import unidecode\n"
                         "    assert unidecode('\u00e9t\u00e9') == 'ete'\n",
    "tests/test_hermetic.py": "import importlib.util\n\n"
                              "def test_dtf_and_its_plugins_are_not_in_the_tasks_python():\n"
                              "    assert importlib.util.find_spec('dtf') is None\n"
                              "    assert importlib.util.find_spec('hypothesis') is None\n",
}


@pytest.fixture
def one_worker(tmp_path):
    system = Up(tmp_path / "d", tmp_path / "state", workers=1)
    if LOCAL_INDEX.is_dir():
        system.env["UV_INDEX_URL"] = LOCAL_INDEX.as_uri()
    system.env["UV_CACHE_DIR"] = str(tmp_path / "uv-cache")
    yield system.start()
    assert system.stop() == 0


def test_declared_dependencies_are_built_once_and_reused_and_system_keeps_the_workers_python(one_worker, tmp_path):
    proj = tmp_path / "proj"
    write_project(proj, {"requirements.txt": "text-unidecode  # not in the worker's venv\n", **TESTS})

    first, said = submit(one_worker, str(proj / "tests"))
    assert first["returncode"] == 0, (said, first)
    assert first["summary"]["passed"] == 2 and "python environment" in said
    [env_dir] = [p for p in (one_worker.data_dir / "cache" / "envs").iterdir()
                 if p.is_dir() and not p.name.startswith(("plugin-", "."))]
    built = (env_dir / "dtf-env.json").stat().st_ino
    assert json.loads((env_dir / "dtf-env.json").read_text())["source"] == "requirements.txt"

    again, said = submit(one_worker, str(proj / "tests"))
    assert again["returncode"] == 0, (said, again)
    assert (env_dir / "dtf-env.json").stat().st_ino == built  # the same env, not a rebuild

    system, said = submit(one_worker, str(proj / "tests"), "--env", "system")
    assert system["returncode"] == 1 and "python environment" not in said
    assert system["summary"]["failed"] == 2  # the worker's Python has dtf and not the declared package


def test_a_requirement_that_cannot_be_installed_is_the_tasks_error_and_not_retried(one_worker, tmp_path):
    proj = tmp_path / "bad"
    write_project(proj, {"requirements.txt": "no-such-package-dtf-test-xyz==1.0\n", **TESTS})
    report, said = submit(one_worker, str(proj / "tests"), "--retries", "2")
    assert report["returncode"] == 1 and len(report["tasks"]) == 2, (said, report)  # a task per test file
    for task in report["tasks"]:
        assert (task["state"], task["attempts"]) == ("error", 1)
        assert "cannot build the task's environment" in task["reason"]
    results = [e for e in asyncio.run(_events(one_worker.url, [subjects.run_all(report["run_id"])]))
               if isinstance(e, ev.ResultReported)]
    assert [r.category for r in results] == ["task", "task"]
    assert all("no-such-package-dtf-test-xyz" in r.output_tail for r in results)
