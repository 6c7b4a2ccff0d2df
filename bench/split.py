"""History-based splitting and warm pytest processes, measured against their peers in one run.

    python bench/split.py [--files 60] [--tests 8] [--shards 12]

Generates a suite of many small test files (each imports a little, its tests take 0-30 ms, a few
files are much slower), then:

  A. per-shard overhead, no bus: the same shards run one after another by a fresh pytest each
     (cold, what a plain test task does) and by one warm pytest process (dtf.workers.warm);
  B. end to end on this machine: `pytest -n 2` (pytest-xdist) against `dtf up --workers 2` with
     `dtf submit --split 2 --wait`, first with no history, then with the first run's durations as
     history (warm run), and with `--cold`. The lower bound is the recorded test time over 2.

It prints wall times and ratios; nothing is asserted (tests/ has the correctness tests).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from dtf import split
from dtf.spec import TaskSpec
from dtf.workers import warm
from dtf.workers.runner import run_attempt

HEADER = "import json, decimal, fractions, statistics, time\n\n"


def make_suite(root: Path, files: int, tests: int, seed: int = 7) -> None:
    rng = random.Random(seed)
    for f in range(files):
        slow = f % 15 == 0  # a few files an order of magnitude slower, as real suites have
        body = [HEADER]
        for t in range(tests):
            seconds = rng.uniform(0.1, 0.4) if slow else rng.uniform(0.0, 0.03)
            body.append(f"def test_{t}():\n    time.sleep({seconds:.4f})\n\n")
        (root / f"test_mod_{f:03d}.py").write_text("".join(body))


def collect(root: Path) -> list[str]:
    from dtf.cli.splitting import collect as collect_ids

    return collect_ids(root, ["."], [])


async def per_shard_overhead(root: Path, shards: list[list[str]], scratch: Path) -> tuple[float, float]:
    def spec(ids: list[str]) -> TaskSpec:
        return TaskSpec(type="test", config={"paths": ids, "split": {"suite": ["."], "warm": True}})

    started = time.perf_counter()
    for i, ids in enumerate(shards):
        result = await run_attempt(spec(ids), root, scratch / f"cold-{i}")
        assert result.outcome == "passed", result.output_tail
    cold = time.perf_counter() - started
    pool = warm.WarmPool(scratch / "warm", sys.executable)
    try:
        started = time.perf_counter()
        for i, ids in enumerate(shards):
            launch = pool.launcher("bench", spec(ids))
            result = await run_attempt(spec(ids), root, scratch / f"warm-{i}", launch=launch)
            assert result.outcome == "passed", result.output_tail
        hot = time.perf_counter() - started
    finally:
        await pool.close()
    return cold, hot


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class System:
    """`dtf up --workers 2` in a scratch directory, with its own context."""

    def __init__(self, scratch: Path) -> None:
        self.env = {**os.environ, "XDG_STATE_HOME": str(scratch / "state"), "XDG_CACHE_HOME": str(scratch / "cache")}
        self.env.pop("DTF_NATS_URL", None)
        self.log = open(scratch / "up.log", "ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dtf", "up", "--workers", "2", "--data-dir", str(scratch / "data"),
             "--nats-port", str(free_port()), "--no-dashboard"],
            stdout=subprocess.PIPE, stderr=self.log, env=self.env, text=True)
        line = self.process.stdout.readline()
        if not line.startswith("export DTF_NATS_URL="):
            raise SystemExit(f"dtf up did not start: {line!r} (see {scratch / 'up.log'})")
        self.url = line.strip().split("=", 1)[1]

    def submit(self, suite: Path, *args: str) -> tuple[float, dict]:
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "dtf", "submit", str(suite), *args, "--wait", "--json"],
                              capture_output=True, text=True, env=self.env, timeout=900, check=False)
        wall = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"dtf submit failed ({done.returncode}): {done.stderr[-2000:]}")
        return wall, json.loads(done.stdout)

    def recorded(self, run_id: str, expected: int) -> list[dict]:
        """The run's test results from the projector, asked as the CLI would (the context's creds)."""
        from dtf.cli.commands_query import ask
        from dtf.cli.common import connected

        async def main() -> list[dict]:
            rows: list[dict] = []
            async with connected(None, None, "bench-split") as nc:
                for _ in range(300):
                    rows = await ask(nc, "results", {"run_id": run_id})
                    if len(rows) >= expected:
                        break
                    await asyncio.sleep(0.1)
            return rows

        os.environ["XDG_STATE_HOME"] = self.env["XDG_STATE_HOME"]
        os.environ.pop("DTF_NATS_URL", None)
        return asyncio.run(main())

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(timeout=120)
        self.log.close()


def timed(argv: list[str], cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=900, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {done.stdout[-2000:]}")
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=60)
    parser.add_argument("--tests", type=int, default=8, help="tests per file")
    parser.add_argument("--shards", type=int, default=12, help="shards for part A")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dtf-bench-split-") as tmp:
        scratch = Path(tmp)
        suite = scratch / "suite"
        suite.mkdir()
        make_suite(suite, args.files, args.tests)
        nodeids = collect(suite)
        print(f"suite: {args.files} files, {len(nodeids)} tests")

        per_shard = [list(s.nodeids) for s in split.pack(
            split.units(nodeids, {n: 1.0 for n in nodeids}, "file", args.shards), args.shards, min_shard_s=0)]
        cold, hot = asyncio.run(per_shard_overhead(suite, per_shard, scratch))
        print(f"A. {len(per_shard)} shards one after another: cold pytest per shard {cold:.2f}s, "
              f"warm process {hot:.2f}s; cold/warm = {cold / hot:.2f}")

        xdist = timed([sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider", "."], suite)
        serial = timed([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "."], suite)
        system = System(scratch)
        try:
            first, report = system.submit(suite, "--split", "2")
            rows = system.recorded(report["run_id"], len(nodeids))
            bound = sum(r["duration_s"] for r in rows) / 2
            warm_run, _ = system.submit(suite, "--split", "2")
            cold_run, _ = system.submit(suite, "--split", "2", "--cold")
        finally:
            system.stop()
        print(f"B. pytest serial {serial:.2f}s, pytest -n 2 {xdist:.2f}s; "
              f"lower bound (recorded test time / 2) {bound:.2f}s")
        print(f"   dtf --split 2: first run {first:.2f}s, warm history {warm_run:.2f}s, warm history --cold "
              f"{cold_run:.2f}s")
        print(f"   ratios: dtf first / xdist = {first / xdist:.2f}, "
              f"dtf warm / xdist = {warm_run / xdist:.2f}, "
              f"dtf warm / lower bound = {warm_run / bound:.2f}, "
              f"dtf --cold / dtf warm = {cold_run / warm_run:.2f}")


if __name__ == "__main__":
    main()
