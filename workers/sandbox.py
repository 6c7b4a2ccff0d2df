"""Keeping a task attempt away from the worker's credentials: where it runs, as whom, and what is
left of it afterwards.

Every attempt (unless `--isolate off`) runs in a fresh directory under the system temp dir
(`<tmp>/dtf-attempts/<worker>-<task>-<attempt>`), outside the worker's data, cache and context dirs,
removed afterwards; HOME and TMPDIR point into it; the environment has no credentials
(`environment.scrubbed`). When the worker runs as root it also runs each attempt as its own
unprivileged uid (gid the same, no supplementary groups) from `--task-uids`, so the worker's 0600
creds, its 0700 data dir and the cache it owns are out of reach, and at the end every process of that
uid is killed (a `setsid` child leaves the process group, not the uid). A worker that is not root
cannot switch uid: it says so at start, and `--isolate on` refuses to start.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

log = logging.getLogger("dtf.worker.sandbox")

Mode = Literal["auto", "on", "off"]
DEFAULT_UIDS = range(20000, 21000)
KILL = "/bin/kill"


class SandboxError(RuntimeError):
    """The worker was asked to isolate tasks and cannot."""


def decide(mode: Mode, is_root: bool) -> tuple[bool, bool]:
    """(fresh dir + stripped env, a uid per attempt) for a mode: off neither, auto the uid only as
    root, on both or SandboxError."""
    if mode == "off":
        return False, False
    if mode == "on" and not is_root:
        raise SandboxError("--isolate on needs a worker running as root (to run each task as its own uid)")
    return True, is_root


def parse_uids(text: str) -> range:
    """`20000-20999` -> range(20000, 21000); ValueError when not such a range of unprivileged uids."""
    low, _, high = text.partition("-")
    first, last = int(low), int(high or low)
    if first < 1000 or last < first:
        raise ValueError("a range FIRST-LAST of uids at or above 1000")
    return range(first, last + 1)


@dataclass
class Sandbox:
    """This worker's isolation policy and the uids its running attempts hold."""

    fresh_dir: bool = False
    uids: range | None = None
    """None: attempts run as the worker's own uid."""
    base: Path = field(default_factory=lambda: Path(tempfile.gettempdir()) / "dtf-attempts")
    _held: dict[int, int] = field(default_factory=dict)
    """uid -> the open lock file claiming it."""

    @classmethod
    def start(cls, mode: Mode, uids: range = DEFAULT_UIDS) -> Sandbox:
        fresh, by_uid = decide(mode, os.geteuid() == 0)
        if by_uid and not runs_python_as(uids.start):
            problem = (f"uid {uids.start} cannot run this worker's Python ({sys.executable}): a directory on its "
                       "path is closed to other users (e.g. a pyenv or venv under a 0700 /root)")
            if mode == "on":  # command tasks still run isolated; test tasks cannot start
                log.error("isolation: %s; test tasks will fail to start: install Python and dtf where other "
                          "users can read them", problem)
            else:
                log.warning("isolation: %s, so tasks run as the worker's own user", problem)
                by_uid = False
        if fresh and not by_uid:
            log.warning("isolation: the worker is not root, so it cannot run tasks as another uid: a task "
                        "runs as the worker's own user (fresh directory and credential-free environment only) "
                        "and can read whatever that user can")
        elif by_uid:
            log.info("isolation: each task runs as its own uid from %d-%d", uids.start, uids[-1])
        return cls(fresh_dir=fresh, uids=uids if by_uid else None)

    @property
    def by_uid(self) -> bool:
        """Whether tasks run as task uids (root, and isolation not off nor fallen back)."""
        return self.uids is not None

    def attempt_dir(self, fallback: Path, name: str) -> Path:
        """Where an attempt's scratch (and, without a workspace, its cwd) lives."""
        if not self.fresh_dir:
            return fallback
        self.base.mkdir(mode=0o711, parents=True, exist_ok=True)  # traversable, not listable
        return self.base / name

    def take_uid(self) -> int | None:
        """A uid no running attempt holds, on this machine: several workers share the range, so each
        uid is claimed by an flock on `<base>/.uid-<n>.lock`, held until `release_uid` (blocking)."""
        if self.uids is None:
            return None
        self.base.mkdir(mode=0o711, parents=True, exist_ok=True)
        for uid in self.uids:
            if uid in self._held:
                continue
            fd = os.open(self.base / f".uid-{uid}.lock", os.O_RDWR | os.O_CREAT, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                continue
            self._held[uid] = fd
            # The lock file is marked while held and cleared by release_uid: a mark left means a
            # worker died holding the uid, and what its attempt left running must not meet this one.
            if os.pread(fd, 1, 0):
                kill_all_of(uid)
            os.pwrite(fd, b"held", 0)
            return uid
        raise SandboxError(f"every task uid in {self.uids.start}-{self.uids[-1]} is in use")

    def release_uid(self, uid: int | None) -> None:
        """Kill every process left of `uid`, then hand it back (blocking: run it in a thread)."""
        if uid is None:
            return
        kill_all_of(uid)
        fd = self._held.pop(uid, None)
        if fd is not None:
            os.ftruncate(fd, 0)  # released cleanly: nothing of it is left running
            os.close(fd)  # drops the flock


def hand_over(path: Path, uid: int | None) -> None:
    """Make an attempt's directory tree the task uid's (blocking)."""
    if uid is None:
        return
    for root, dirs, files in os.walk(path):
        os.chown(root, uid, uid)
        for name in (*dirs, *files):
            with contextlib.suppress(OSError):
                os.chown(os.path.join(root, name), uid, uid, follow_symlinks=False)


def runs_python_as(uid: int, python: str = sys.executable) -> bool:
    """Whether `uid` can start `python` (this worker's) with its pytest: a test task runs it."""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        return subprocess.run([python, "-c", "import pytest"], user=uid, group=uid, extra_groups=[],
                              cwd="/", stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, timeout=60, check=False).returncode == 0
    return False


def task_env(env: dict[str, str], home: Path) -> dict[str, str]:
    """The task's environment with HOME and TMPDIR its own directory."""
    return {**env, "HOME": str(home), "TMPDIR": str(home)}


def kill_all_of(uid: int) -> None:
    """SIGKILL every process of `uid` by a child running as it: kill(-1) reaches exactly the
    processes that uid may signal (its own), which a scan of /proc could race."""
    # kill(1) execs in a fraction of an interpreter's start-up (it costs per attempt: bench/dispatch.py)
    argv = [KILL, "-KILL", "-1"] if os.access(KILL, os.X_OK) else [sys.executable, "-S", "-c",
                                                                 "import os; os.kill(-1, 9)"]
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        subprocess.run(argv, user=uid, group=uid,
                       extra_groups=[], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL, timeout=30, check=False)


def remove(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)


sandbox = Sandbox()
"""This worker process's policy; `dtf worker` sets it from --isolate (default here: off, for embedding)."""
