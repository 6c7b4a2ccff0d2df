"""A test task's own Python environment, built with uv once per EnvSpec digest and reused.

    <cache>/envs/<digest>/            a relocatable venv with the task's requirements and pytest;
                                      its dtf-env.json marker names the pytest plugins it installed
    <cache>/envs/.build-<digest>-*/   a build in progress, renamed into place when it is complete,
                                      so a half-built env is never used
    <cache>/envs/<digest>.lock        flock'd by whoever builds, so concurrent attempts (and workers
                                      sharing the cache) build once; the others wait and reuse it
    <cache>/envs/plugin-<hash>/       dtf's reporting plugin as standalone modules for PYTHONPATH
                                      (the env does not have dtf installed)

uv runs with the worker's own environment, so its index settings (UV_INDEX_URL, UV_EXTRA_INDEX_URL,
UV_FIND_LINKS, UV_OFFLINE, ...) apply. A resolve or install failure is the task's (`BuildError`): the
same requirements fail the same on any worker. Nothing is evicted: each env's marker is touched on
use, so an LRU by mtime can be added when disks fill.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from dtf.pyenv import EnvSpec, env_digest
from dtf.workers import nodeids, pytest_plugin

MARKER = "dtf-env.json"
PLUGIN_MODULE = "dtf_report_plugin"
MAX_OUTPUT = 8000
"""Characters of uv's output a BuildError keeps (its last ones: where uv says what failed)."""
_PLUGINS = ("import importlib.metadata as m, json; "
            "print(json.dumps(sorted({e.name for e in m.entry_points(group='pytest11')})))")


class BuildError(Exception):
    """uv could not build the environment; the message is uv's output."""


@dataclass(frozen=True)
class Env:
    path: Path
    python: str
    plugins: list[str]
    """The pytest11 entry points installed in the env: the user's own plugins, loaded with -p."""
    plugin_dir: Path
    built: bool
    """Whether this call built it (False: reused from the cache)."""


def uv_bin() -> str:
    from uv import find_uv_bin

    return find_uv_bin()


class EnvCache:
    """The worker's environments under one cache directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._locks: dict[str, asyncio.Lock] = {}

    async def ensure(self, spec: EnvSpec) -> Env:
        digest = env_digest(spec)  # not the wire's: a forged digest must not name another's env
        async with self._locks.setdefault(digest, asyncio.Lock()):
            plugin_dir = await asyncio.to_thread(self._plugin_dir)
            path, built = await asyncio.to_thread(self._locked_build, spec, digest)
            marker = json.loads((path / MARKER).read_text())
            return Env(path, str(path / "bin" / "python"), marker["plugins"], plugin_dir, built)

    def _locked_build(self, spec: EnvSpec, digest: str) -> tuple[Path, bool]:
        final = self.root / digest
        self.root.mkdir(parents=True, exist_ok=True)
        with open(self.root / f"{digest}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # in a thread: another worker may hold it for a while
            if (final / MARKER).is_file():
                os.utime(final / MARKER)
                return final, False
            build = Path(tempfile.mkdtemp(prefix=f".build-{digest}-", dir=self.root))
            try:
                _build(spec, build)
                shutil.rmtree(final, ignore_errors=True)  # a marker-less leftover
                os.rename(build, final)
            finally:
                shutil.rmtree(build, ignore_errors=True)
            return final, True

    def _plugin_dir(self) -> Path:
        sources = {f"{PLUGIN_MODULE}.py": Path(pytest_plugin.__file__).read_bytes(),
                   "dtf_nodeids.py": Path(nodeids.__file__).read_bytes()}
        tag = hashlib.sha256(b"".join(sources.values())).hexdigest()[:16]
        final = self.root / f"plugin-{tag}"
        if not final.is_dir():
            self.root.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".plugin-", dir=self.root))
            for name, data in sources.items():
                (tmp / name).write_bytes(data)
            try:
                os.rename(tmp, final)
            except OSError:  # someone else put the same files there first
                shutil.rmtree(tmp, ignore_errors=True)
        return final


def _run(argv: list[str], log: list[str]) -> str:
    done = subprocess.run(argv, capture_output=True, text=True, env=dict(os.environ), stdin=subprocess.DEVNULL)
    log.append(f"$ {' '.join(argv)}\n{done.stdout}{done.stderr}")
    if done.returncode != 0:
        raise BuildError("".join(log)[-MAX_OUTPUT:])
    return done.stdout


def _build(spec: EnvSpec, into: Path) -> None:
    """uv venv + uv pip install into `into` (blocking: runs in a thread)."""
    uv, log, started = uv_bin(), [], time.monotonic()
    (into / "requirements.txt").write_text("".join(f"{line}\n" for line in spec.requirements))
    _run([uv, "venv", "--quiet", "--relocatable", "--allow-existing", "--python", spec.python, str(into)], log)
    python = str(into / "bin" / "python")
    _run([uv, "pip", "install", "--quiet", "--python", python, "-r", str(into / "requirements.txt"), "pytest"],
         log)
    plugins = json.loads(_run([python, "-c", _PLUGINS], log))
    (into / MARKER).write_text(json.dumps({"digest": env_digest(spec), "python": spec.python,
                                           "plugins": plugins, "source": spec.source,
                                           "build_seconds": round(time.monotonic() - started, 3)}))
