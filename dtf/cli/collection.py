"""Collecting a suite's node ids at submit, for `dtf submit --split` (blocking: call it in a thread).

`python -m pytest --collect-only -q --rootdir ROOT` runs in the submitted root. The submitter can
run the suite locally (it is their checkout and environment), so a collection error stops the
submission with pytest's own words instead of failing every shard on the workers. `--rootdir ROOT`
makes the node ids relative to the shipped root, so each is a path a worker can run from its
workspace.

Collection is mostly importing the test modules (networkx: 11.4 s for 265 files), one process,
one core. So, on a machine with more than one core and a suite of at least PARALLEL_MIN_FILES
files, pytest first lists the files it would collect without importing them (`pytest_discover`),
and slices of that list, consecutive and of about equal bytes, are collected in parallel; their
node ids, joined in order, are what one collection prints. Arguments that are node ids, or
`--pyargs`, are collected in one go.

A shipped suite's node ids are cached (~/.cache/dtf/collections, or $XDG_CACHE_HOME/dtf/...) by
what decides them: the workspace's content hash, the arguments, the interpreter and the versions of
every package installed in it. Submitting the same tree again skips the collection.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec

from dtf.cli.common import CliError
from dtf.cli.pytest_discover import OUT_ENV

COLLECT_TIMEOUT_S = 600.0
PARALLEL_MIN_FILES = 40
"""Below this, a second pytest start-up costs more than the imports it would share out."""
MAX_COLLECTORS = 8
SKIP_DIRS = frozenset({"__pycache__", "node_modules", "venv", "build", "dist"})
"""Not walked when counting a tree's .py files (pytest's own norecursedirs, roughly)."""


def parse_collection(output: str) -> list[str]:
    """The node ids `pytest --collect-only -q` printed: its lines up to the first blank one (an item
    of a non-Python plugin may be a bare path)."""
    nodeids = []
    for line in output.splitlines():
        if not line.strip():
            break
        nodeids.append(line.strip())
    return nodeids


def _pytest(root: Path, args: list[str], pytest_args: list[str], python: str,
            env: dict[str, str] | None = None, *plugins: str) -> subprocess.CompletedProcess:
    argv = [python, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
            *(arg for plugin in plugins for arg in ("-p", plugin)), "--rootdir", str(root),
            *args, *pytest_args]
    try:
        return subprocess.run(argv, cwd=root, capture_output=True, text=True, timeout=COLLECT_TIMEOUT_S,
                              stdin=subprocess.DEVNULL, check=False, env=env)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CliError(f"cannot collect the tests to split them: {exc}") from None


def collect_once(root: Path, args: list[str], pytest_args: list[str], python: str = sys.executable,
                 *, allow_empty: bool = False) -> list[str]:
    """The node ids one `pytest --collect-only` of `args` prints."""
    done = _pytest(root, args, pytest_args, python)
    if done.returncode == 5 and allow_empty:
        return []
    if done.returncode == 5:
        raise CliError(f"pytest collected no tests under {' '.join(args)}")
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-15:]
        raise CliError("collecting the tests to split them failed (pytest exit code "
                       f"{done.returncode}):\n" + "\n".join(tail))
    return parse_collection(done.stdout)


def discover(root: Path, args: list[str], pytest_args: list[str],
             python: str = sys.executable) -> list[str] | None:
    """The files a collection of `args` would import, in its order; None when pytest cannot say
    (the caller then collects in one go, which reports any error properly)."""
    with tempfile.TemporaryDirectory(prefix="dtf-discover-") as tmp:
        out = Path(tmp) / "files.txt"
        done = _pytest(root, args, pytest_args, python, {**os.environ, OUT_ENV: str(out)},
                       "dtf.cli.pytest_discover")
        if done.returncode not in (0, 5) or not out.exists():
            return None
        return [line for line in out.read_text(encoding="utf-8").splitlines() if line]


def slices(files: list[str], sizes: list[int], parts: int) -> list[list[str]]:
    """`files` cut into at most `parts` consecutive slices of about equal total size."""
    total = sum(sizes)
    result: list[list[str]] = [[]]
    done = 0
    for name, size in zip(files, sizes, strict=True):
        if result[-1] and len(result) < parts and done >= total * len(result) / parts:
            result.append([])
        result[-1].append(name)
        done += size
    return result


def whole_files(args: list[str], pytest_args: list[str]) -> bool:
    """Whether the arguments name whole files and directories (not node ids, not `--pyargs`
    packages), so that the files `discover` lists stand for them."""
    return all("::" not in arg for arg in args) and "--pyargs" not in pytest_args


def collect(root: Path, args: list[str], pytest_args: list[str], python: str = sys.executable,
            *, collectors: int | None = None, files: list[str] | None = None) -> list[str]:
    """The suite's node ids, relative to `root`: in parallel slices where that pays (see above).
    `files`: what `discover` said for these arguments, if it was asked already."""
    collectors = collectors or min(os.cpu_count() or 1, MAX_COLLECTORS)
    parallel = (collectors > 1 and whole_files(args, pytest_args)
                and _python_files(root, args, PARALLEL_MIN_FILES))
    if not parallel:
        return collect_once(root, args, pytest_args, python)
    if files is None:
        files = discover(root, args, pytest_args, python)
    if files is None or len(files) < PARALLEL_MIN_FILES:
        return collect_once(root, args, pytest_args, python)
    sizes = [_size(root / name) for name in files]
    with ThreadPoolExecutor(collectors) as pool:
        parts = list(pool.map(lambda part: collect_once(root, part, pytest_args, python, allow_empty=True),
                              slices(files, sizes, collectors)))
    nodeids = list(dict.fromkeys(n for part in parts for n in part))
    if not nodeids:
        raise CliError(f"pytest collected no tests under {' '.join(args)}")
    return nodeids


def _python_files(root: Path, args: list[str], enough: int) -> bool:
    """Whether the arguments hold at least `enough` .py files (a cheap walk, before asking pytest)."""
    seen = 0
    for arg in args:
        start = root / arg
        if start.is_file():
            seen += start.suffix == ".py"
            continue
        for _, dirs, names in os.walk(start):
            dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS]
            seen += sum(name.endswith(".py") for name in names)
            if seen >= enough:
                return True
    return seen >= enough


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 1


def collections_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "dtf" / "collections"


def collection_key(workspace_sha: str, args: list[str], pytest_args: list[str], python: str) -> str:
    """What decides a collection's node ids besides the files: arguments, interpreter, installed
    packages (a plugin or a dependency upgrade can change parametrization). Only the running
    interpreter's packages can be listed, so another `python` is never cached."""
    blob = json.dumps([workspace_sha, args, pytest_args, python, sys.version, _installed()])
    return hashlib.sha256(blob.encode()).hexdigest()


@functools.cache
def _installed() -> list[str]:
    """This interpreter's packages and versions: listed once per process (it reads every package's
    metadata), however often a key is made."""
    return sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions())


def _cache_entry(workspace_sha: str | None, args: list[str], pytest_args: list[str],
                 python: str) -> Path | None:
    if workspace_sha is None or python != sys.executable:
        return None
    return collections_dir() / f"{collection_key(workspace_sha, args, pytest_args, python)}.json"


def cached(args: list[str], pytest_args: list[str], workspace_sha: str | None,
           python: str = sys.executable) -> list[str] | None:
    """The node ids of the same workspace collected the same way before, if they are cached."""
    path = _cache_entry(workspace_sha, args, pytest_args, python)
    if path is None:
        return None
    try:
        return msgspec.json.decode(path.read_bytes(), type=list[str]) or None
    except (OSError, msgspec.DecodeError):
        return None  # not cached yet, or a damaged entry: collect again


def cached_collect(root: Path, args: list[str], pytest_args: list[str], workspace_sha: str | None,
                   python: str = sys.executable, *, files: list[str] | None = None) -> tuple[list[str], bool]:
    """`collect`, answered from the cache when the same workspace was collected the same way before;
    whether it was. Blocking: call it in a thread."""
    nodeids = cached(args, pytest_args, workspace_sha, python)
    if nodeids is not None:
        return nodeids, True
    nodeids = collect(root, args, pytest_args, python, files=files)
    path = _cache_entry(workspace_sha, args, pytest_args, python)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            scratch = path.with_suffix(f".{os.getpid()}.tmp")
            scratch.write_bytes(msgspec.json.encode(nodeids))
            scratch.replace(path)  # atomic: a concurrent submit reads the old entry or the new one
        except OSError:
            pass  # a read-only home: collect every time
    return nodeids, False
