"""`dtf up` as the end-to-end tests start it: auth on, no dashboard, a data dir and state dir of its
own under `root`, and none of the caller's DTF_* or GitHub Actions variables; stopped with SIGTERM,
which must end it with exit 0."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

CLEARED = ("DTF_NATS_URL", "DTF_CREDS", "DTF_CA", "GITHUB_STEP_SUMMARY", "GITHUB_ACTIONS")


@dataclass(frozen=True)
class Up:
    process: subprocess.Popen
    url: str
    admin: Path
    """The admin credentials `dtf up` made and printed."""
    env: dict[str, str]
    """The environment it runs with, for the CLI calls a test makes against it."""


@contextlib.contextmanager
def dtf_up(root: Path, *args: str, workers: int = 1, env: dict[str, str] | None = None) -> Iterator[Up]:
    """`dtf up --workers N ... ARGS` with its data in `root/d`, its stderr in `root/up.log`."""
    env = {k: v for k, v in {**os.environ, **(env or {})}.items() if k not in CLEARED}
    env["XDG_STATE_HOME"] = str(root / "state")
    up = subprocess.Popen(
        [sys.executable, "-m", "dtf", "up", "--workers", str(workers), "--data-dir", str(root / "d"),
         "--nats-port", "0", "--no-dashboard", *args],
        stdout=subprocess.PIPE, stderr=(root / "up.log").open("ab"), env=env, text=True)
    try:
        url = up.stdout.readline().strip().split("=", 1)[1]
        admin = Path(up.stdout.readline().strip().split("=", 1)[1])
        yield Up(up, url, admin, env)
    finally:
        up.send_signal(signal.SIGTERM)
        assert up.wait(timeout=60) == 0
