"""Task environments: what building one costs, what reusing it costs, against the worker's own Python.

    python bench/envcache.py [--requirements "text-unidecode six"]

Starts `dtf up` (one worker, no auth) on a scratch data dir, writes a tiny project declaring the
requirements and one test importing nothing but the standard library, and times three `dtf submit
--wait` runs of it end to end: the first (the worker builds the env with uv into
<cache>/envs/<digest>), the second (the cached env is reused), and `--env system` (today's path: the
worker's own Python). uv's package cache is scratch too, so the first build downloads from the index
(UV_INDEX_URL; on this machine file:///opt/pypi/simple is used when it exists). Prints the three
wall times and the ratios; no thresholds.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LOCAL_INDEX = Path("/opt/pypi/simple")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requirements", default="text-unidecode six")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtf-envcache-") as tmp:
        root = Path(tmp)
        env = {**os.environ, "XDG_STATE_HOME": str(root / "state"), "UV_CACHE_DIR": str(root / "uv-cache")}
        env.pop("DTF_NATS_URL", None)
        if LOCAL_INDEX.is_dir() and "UV_INDEX_URL" not in env:
            env["UV_INDEX_URL"] = LOCAL_INDEX.as_uri()
        proj = root / "proj"
        (proj / "tests").mkdir(parents=True)
        (proj / "pyproject.toml").write_text("[tool.pytest.ini_options]\n")
        (proj / "requirements.txt").write_text("\n".join(args.requirements.split()) + "\n")
        (proj / "tests" / "test_a.py").write_text(
            "".join(f"def test_{i}():\n    assert sum(range({i})) >= 0\n" for i in range(20)))
        up = subprocess.Popen([sys.executable, "-m", "dtf", "up", "--workers", "1", "--data-dir", str(root / "d"),
                               "--no-dashboard", "--no-auth"], stdout=subprocess.PIPE, text=True, env=env,
                              stderr=open(root / "up.log", "w"))
        try:
            line = up.stdout.readline()
            if not line.startswith("export DTF_NATS_URL="):
                sys.exit(f"dtf up printed {line!r}: see {root / 'up.log'}")
            times = {}
            for label, extra in (("first build", []), ("reuse", []), ("system python", ["--env", "system"])):
                started = time.monotonic()
                done = subprocess.run([sys.executable, "-m", "dtf", "submit", "--wait", str(proj / "tests"), *extra],
                                      capture_output=True, text=True, env=env, timeout=600)
                times[label] = time.monotonic() - started
                print(f"{label:14s} {times[label]:7.2f} s  (exit {done.returncode})")
                if done.returncode != 0:
                    print(done.stderr[-2000:])
            system = times["system python"]
            print(f"first build / system python: {times['first build'] / system:.2f}x; "
                  f"reuse / system python: {times['reuse'] / system:.2f}x")
        finally:
            up.send_signal(signal.SIGTERM)
            up.wait(timeout=60)


if __name__ == "__main__":
    main()
