"""The project a test submission ships: the directory pytest takes as its rootdir for the arguments.

`dtf submit PATH...` ships that whole directory and runs PATH relative to it, inside it, so the
worker's pytest reads the same configuration file (`pythonpath = ["src"]`, addopts, markers), loads
the same conftest.py files and reports the same node ids as `pytest PATH` run in the project. The
rules are pytest's own (`_pytest/config/findpaths.py`, `determine_setup` without `-c`/`--rootdir`),
written out because pytest need not be installed where `dtf submit` runs and that module is private:

  1. the common ancestor of the arguments (a node id counts by its path, a missing path not at all,
     a file by its directory);
  2. that directory or the nearest parent with a configuration file: in one directory, in this
     order, pytest.toml, .pytest.toml, pytest.ini, .pytest.ini (whatever they hold), pyproject.toml
     with a [tool.pytest] or [tool.pytest.ini_options] table, tox.ini with [pytest], setup.cfg with
     [tool:pytest];
  3. else the nearest pyproject.toml, whatever it holds;
  4. else the nearest directory with a setup.py;
  5. else pytest takes the common ancestor of the invocation directory and (1). dtf ships the git
     work tree holding (1) instead, or (1) itself outside git: the project's other files live there,
     and a rootdir that depends on where the submitter stood would make node ids vary with it.

The root is never above the git work tree holding the arguments, so a stray configuration file
in a home directory cannot ship the home directory. pytest's last resort for arguments in
different directories (a configuration file below their common ancestor) is not followed: the
shipped root must hold every argument.
"""

from __future__ import annotations

import os
import re
import subprocess
import tomllib
from dataclasses import dataclass
from pathlib import Path

CONFIG_NAMES = ("pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini", "pyproject.toml", "tox.ini",
                "setup.cfg")
"""pytest's configuration files, in the order it prefers them within one directory."""

_INI_SECTION = {"tox.ini": re.compile(r"^\[pytest\]", re.M),
                "setup.cfg": re.compile(r"^\[tool:pytest\]", re.M)}


@dataclass(frozen=True)
class Project:
    root: Path
    """The directory shipped, and the rootdir the node ids are relative to."""
    configfile: Path | None
    """pytest's configuration file there, if any (a pyproject.toml found by rule 3 is one, with no
    options in it)."""


def find(paths: list[Path]) -> Project:
    """The project holding `paths` (see the module docstring). Blocking: it reads files and asks git."""
    ancestor = common_ancestor(paths)
    ceiling = git_toplevel(ancestor)
    candidates = [ancestor, *ancestor.parents]
    if ceiling is not None and (ceiling == ancestor or ceiling in ancestor.parents):
        candidates = candidates[:candidates.index(ceiling) + 1]
    for directory in candidates:
        for name in CONFIG_NAMES:
            if configures_pytest(directory / name):
                return Project(directory, directory / name)
    for directory in candidates:
        if (directory / "pyproject.toml").is_file():
            return Project(directory, directory / "pyproject.toml")
    for directory in candidates:
        if (directory / "setup.py").is_file():
            return Project(directory, None)
    return Project(ceiling if ceiling in candidates else ancestor, None)


def pinned_args(found: Project) -> list[str]:
    """pytest arguments that hold a worker's pytest, in its copy of the project, to the project's
    configuration: left to itself it would also look above the copy (whose directory may lie inside
    another project, as `dtf up --data-dir .dtf` puts it) for a configuration file the project does
    not have. `-c FILE` names the project's own (pytest then roots at its directory); a project
    without one gets `-c /dev/null`, no configuration, and `--rootdir .`, its root."""
    if found.configfile is not None:
        return ["-c", found.configfile.name]
    return ["-c", os.devnull, "--rootdir", "."]


def common_ancestor(paths: list[Path]) -> Path:
    """The deepest directory holding every existing path (node ids cut at `::`)."""
    existing = [Path(str(p).partition("::")[0]).resolve() for p in paths]
    existing = [p if p.is_dir() else p.parent for p in existing if p.exists()]
    if not existing:
        return Path.cwd()
    return Path(os.path.commonpath([str(p) for p in existing]))


def configures_pytest(path: Path) -> bool:
    """Whether pytest takes `path` as its configuration file (an unreadable one does not count)."""
    if not path.is_file():
        return False
    if path.name in ("pytest.toml", ".pytest.toml", "pytest.ini", ".pytest.ini"):
        return True
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    if path.name != "pyproject.toml":
        return bool(_INI_SECTION[path.name].search(text))
    try:
        table = tomllib.loads(text).get("tool", {}).get("pytest")
    except tomllib.TOMLDecodeError:
        return False
    # [tool.pytest.ini_options], or (pytest 9) options in [tool.pytest] itself; an empty table is none
    return isinstance(table, dict) and bool(table)


def git_toplevel(directory: Path) -> Path | None:
    """The root of the git work tree holding `directory`, if git knows one."""
    try:
        done = subprocess.run(["git", "-C", str(directory), "rev-parse", "--show-toplevel"],
                              capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    top = done.stdout.strip()
    return Path(top).resolve() if done.returncode == 0 and top else None
