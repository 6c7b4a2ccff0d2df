"""What Python environment a test task needs: the project's declared dependencies as an `EnvSpec`.

`derive(root, python)` reads the project root `dtf submit` ships (pure: files in, value out) and
inlines the requirement lines, in this order of preference:

    uv.lock            every locked package pinned (`name==version`); the project itself and
                       path/editable sources are left out (the workspace is the project)
    requirements*.txt  their requirement lines (options such as -r/-e/--index-url are skipped:
                       every requirements*.txt at the root is read anyway, and indexes are the
                       worker's choice)
    pyproject.toml     [project].dependencies plus the test-ish extras and dependency groups
                       (test, tests, testing, dev)

The worker (workers/pyenv.py) builds one environment per `digest` with uv and runs the task's pytest
in it. The digest covers only what changes the environment (the format version, python major.minor,
the sorted unique requirement lines), so comments, order and blank lines do not force a rebuild.
"""

from __future__ import annotations

import hashlib
import re
import tomllib
from pathlib import Path

import msgspec

from dtf.limits import MAX_ENV_REQUIREMENTS_BYTES

ENV_VERSION = 1
EXTRA_NAMES = ("test", "tests", "testing", "dev")
ENV_MODES = ("auto", "uv", "system")


class EnvError(ValueError):
    """The project's environment cannot be described (an unreadable or oversized declaration)."""


class EnvSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """A task's Python environment: pip requirement lines for this Python, named by `digest`."""

    version: int = ENV_VERSION
    python: str
    requirements: list[str] = []
    source: str = ""
    """Which file(s) it came from, for people: not part of the digest."""
    digest: str = ""


def env_digest(env: EnvSpec) -> str:
    payload = msgspec.json.encode([env.version, env.python, sorted(set(env.requirements))])
    return hashlib.sha256(payload).hexdigest()[:32]


def make(python: str, requirements: list[str], source: str) -> EnvSpec:
    lines = sorted(set(requirements))
    if sum(len(line) + 1 for line in lines) > MAX_ENV_REQUIREMENTS_BYTES:
        raise EnvError(f"the requirements in {source} exceed {MAX_ENV_REQUIREMENTS_BYTES} bytes")
    env = EnvSpec(python=python, requirements=lines, source=source)
    env.digest = env_digest(env)
    return env


_COMMENT = re.compile(r"(^|\s)#.*$")
"""pip's comment: a # at the start of a line or after whitespace (a URL's #egg= fragment stays)."""


def requirement_lines(text: str) -> list[str]:
    """A requirements file's requirement lines: comments, blanks and option lines dropped."""
    lines = []
    for raw in text.splitlines():
        line = " ".join(_COMMENT.sub("", raw).split())
        if line and not line.startswith("-"):
            lines.append(line)
    return lines


def locked_pins(lock_text: str) -> list[str]:
    """uv.lock's packages as pins; a package locked at several versions (per-platform forks) is left
    to the resolver by name."""
    data = tomllib.loads(lock_text)
    versions: dict[str, set[str]] = {}
    for package in data.get("package", []):
        source = package.get("source", {})
        if not isinstance(source, dict) or {"editable", "virtual", "directory", "path"} & source.keys():
            continue
        if "version" in package:
            versions.setdefault(package["name"], set()).add(package["version"])
    return [f"{name}=={next(iter(v))}" if len(v) == 1 else name for name, v in versions.items()]


def declared(pyproject_text: str) -> list[str]:
    data = tomllib.loads(pyproject_text)
    project = data.get("project", {})
    lines = list(project.get("dependencies", []))
    for table in (project.get("optional-dependencies", {}), data.get("dependency-groups", {})):
        for name in EXTRA_NAMES:
            lines += [item for item in table.get(name, []) if isinstance(item, str)]
    return [" ".join(line.split()) for line in lines]


def _read(path: Path) -> str:
    if path.stat().st_size > MAX_ENV_REQUIREMENTS_BYTES * 16:  # a lockfile is bigger than its pins
        raise EnvError(f"{path.name} is too large to inline ({path.stat().st_size} bytes)")
    return path.read_text(encoding="utf-8")


def derive(root: Path, python: str) -> EnvSpec | None:
    """The environment `root` declares for `python` (major.minor), or None when it declares none."""
    try:
        if (root / "uv.lock").is_file():
            return make(python, locked_pins(_read(root / "uv.lock")), "uv.lock")
        files = sorted(root.glob("requirements*.txt"))
        if files:
            lines = [line for f in files for line in requirement_lines(_read(f))]
            return make(python, lines, ", ".join(f.name for f in files))
        if (root / "pyproject.toml").is_file():
            lines = declared(_read(root / "pyproject.toml"))
            return make(python, lines, "pyproject.toml") if lines else None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise EnvError(f"cannot read the project's dependencies: {exc}") from None
    return None


def choose(mode: str, root: Path | None, python: str) -> EnvSpec | None:
    """`dtf submit --env`: "system" runs on the worker's own Python; "uv" always builds an env (an
    empty one, plus pytest, when nothing is declared); "auto" builds one when something is declared."""
    if mode == "system" or root is None:
        return None
    env = derive(root, python)
    if env is None and mode == "uv":
        env = make(python, [], "none declared")
    return env


_PYTHON_RE = re.compile(r"^3\.\d{1,3}\Z")


def check(env: EnvSpec) -> str | None:
    """Why an EnvSpec from the wire cannot be used, or None."""
    if env.version != ENV_VERSION:
        return f"env version {env.version} is not supported (this dtf knows {ENV_VERSION})"
    if not _PYTHON_RE.match(env.python):
        return f"env python {env.python!r} must be major.minor, e.g. 3.12"
    if env.digest != env_digest(env):
        return "env digest does not match its requirements"
    if any("\n" in line or line.startswith("-") for line in env.requirements):
        return "env requirements must be single requirement lines, not options"
    return None
