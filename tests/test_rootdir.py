"""The project `dtf submit PATH` ships is the rootdir pytest itself picks for PATH: checked against
pytest's own `determine_setup` on the layouts its rules tell apart, without a server."""

from __future__ import annotations

import inspect
import subprocess
from pathlib import Path

import pytest
from _pytest.config import findpaths

from dtf.cli import rootdir

CONFIGURED_PYPROJECT = "[tool.pytest.ini_options]\npythonpath = ['src']\n"
BARE_PYPROJECT = "[project]\nname = 'x'\n"


def build(tmp_path: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return tmp_path


def pytest_setup(args: list[Path], invocation_dir: Path) -> tuple[Path, Path | None]:
    """The rootdir and configuration file pytest would use (its keyword arguments vary by version)."""
    options = {"inifile": None, "override_ini": None, "args": [str(a) for a in args], "rootdir_cmd_arg": None,
               "invocation_dir": invocation_dir}
    accepted = inspect.signature(findpaths.determine_setup).parameters
    rootdir, inipath, *_ = findpaths.determine_setup(**{k: v for k, v in options.items() if k in accepted})
    return Path(rootdir), Path(inipath) if inipath else None


LAYOUTS = {
    "a configured pyproject.toml roots a src layout": (
        {"proj/pyproject.toml": CONFIGURED_PYPROJECT, "proj/src/pkg/__init__.py": "",
         "proj/tests/test_a.py": ""}, ["proj/tests"], "proj"),
    "the nearest configuration file wins": (
        {"proj/pyproject.toml": CONFIGURED_PYPROJECT, "proj/tests/pytest.ini": "[pytest]\n",
         "proj/tests/test_a.py": ""}, ["proj/tests"], "proj/tests"),
    "pytest.ini beats a configured pyproject.toml in the same directory": (
        {"proj/pyproject.toml": CONFIGURED_PYPROJECT, "proj/pytest.ini": "", "proj/tests/test_a.py": ""},
        ["proj/tests"], "proj"),
    "a tox.ini without [pytest] is skipped for setup.cfg's [tool:pytest]": (
        {"proj/tox.ini": "[tox]\n", "proj/setup.cfg": "[tool:pytest]\naddopts = -q\n",
         "proj/tests/test_a.py": ""}, ["proj/tests/test_a.py"], "proj"),
    "a configuration file above beats a bare pyproject.toml below": (
        {"top/pytest.ini": "[pytest]\n", "top/proj/pyproject.toml": BARE_PYPROJECT,
         "top/proj/tests/test_a.py": ""}, ["top/proj/tests"], "top"),
    "a bare pyproject.toml roots the project when nothing configures pytest": (
        {"proj/pyproject.toml": BARE_PYPROJECT, "proj/tests/test_a.py": ""}, ["proj/tests"], "proj"),
    "a bare pyproject.toml beats a setup.py above it": (
        {"top/setup.py": "", "top/proj/pyproject.toml": BARE_PYPROJECT, "top/proj/tests/test_a.py": ""},
        ["top/proj/tests"], "top/proj"),
    "a setup.py roots the project when nothing else does": (
        {"proj/setup.py": "", "proj/tests/unit/test_a.py": ""}, ["proj/tests/unit/test_a.py"], "proj"),
    "node ids count by their file and missing paths not at all": (
        {"proj/pyproject.toml": CONFIGURED_PYPROJECT, "proj/a/test_a.py": "", "proj/b/test_b.py": ""},
        ["proj/a/test_a.py::test_x", "proj/b/test_b.py", "proj/gone"], "proj"),
    "with no configuration at all, the arguments' common ancestor": (
        {"top/a/test_a.py": "", "top/b/test_b.py": ""}, ["top/a", "top/b"], "top"),
}


@pytest.mark.parametrize("layout", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_the_project_root_is_the_rootdir_pytest_picks(tmp_path, layout):
    files, args, expected = layout
    base = build(tmp_path, files)
    paths = [base / a for a in args]
    found = rootdir.find(paths)
    pytests_rootdir, pytests_configfile = pytest_setup(paths, invocation_dir=rootdir.common_ancestor(paths))
    assert found.root == pytests_rootdir == base / expected
    assert found.configfile == pytests_configfile


def git_init(directory: Path) -> None:
    subprocess.run(["git", "init", "-q", str(directory)], check=True)


def test_without_configuration_the_git_work_tree_is_shipped_as_pytest_run_from_it_would_root_it(tmp_path):
    base = build(tmp_path, {"repo/conftest.py": "", "repo/pkg/tests/test_a.py": ""})
    git_init(base / "repo")
    paths = [base / "repo/pkg/tests"]
    found = rootdir.find(paths)
    assert found == rootdir.Project(base / "repo", None)
    assert pytest_setup(paths, invocation_dir=base / "repo")[0] == found.root


def test_a_configuration_file_above_the_git_work_tree_ships_only_the_work_tree(tmp_path):
    base = build(tmp_path, {"home/pytest.ini": "[pytest]\n", "home/repo/tests/test_a.py": ""})
    git_init(base / "home/repo")
    assert rootdir.find([base / "home/repo/tests"]) == rootdir.Project(base / "home/repo", None)


def test_a_broken_pyproject_toml_configures_nothing_but_still_roots_the_project(tmp_path):
    base = build(tmp_path, {"proj/pyproject.toml": "[tool.pytest.ini_options\n", "proj/tests/test_a.py": ""})
    assert rootdir.find([base / "proj/tests"]).root == base / "proj"
