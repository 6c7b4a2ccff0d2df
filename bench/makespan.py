"""A real public suite split by dtf against `pytest -n 2`, in one run on this machine.

    pip install networkx pytest-xdist    # the suite (its tests ship in the wheel) and the peer
    python bench/makespan.py [--package networkx]

The package's installed directory (networkx 3.6: about 6,800 tests, 105 s serially here) is copied to
a scratch directory and run (a) by `pytest -n 2` there, (b) by `dtf up --workers 2` with
`dtf submit DIR --split 2 --wait`: a first run with no history, then a warm-history run. The lower
bound is the recorded test time over 2 workers. Prints wall times and ratios; nothing is asserted.

Known to fail today (issue #3): a suite whose root directory is itself a Python package (networkx's
has __init__.py) is imported under the worker's private copy's name, `workspace`, beside the installed
`networkx`, so modules load twice (networkx: "Algorithm already exists in dispatch namespace") and
every shard errors. The copy must keep the submitted directory's name. `pytest -n 2` took 71.5 s.
"""

from __future__ import annotations

import argparse
import importlib
import shutil
import sys
import tempfile
from pathlib import Path

from split import System, timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--package", default="networkx", help="an installed package that ships its tests")
    args = parser.parse_args()
    installed = Path(importlib.import_module(args.package).__file__).parent
    with tempfile.TemporaryDirectory(prefix="dtf-bench-makespan-") as tmp:
        scratch = Path(tmp)
        suite = scratch / args.package
        shutil.copytree(installed, suite, ignore=shutil.ignore_patterns("__pycache__"))
        xdist = timed([sys.executable, "-m", "pytest", "-n", "2", "-q", "-p", "no:cacheprovider", "."], suite)
        print(f"pytest -n 2: {xdist:.1f}s", flush=True)
        system = System(scratch)
        try:
            first, report = system.submit(suite, "--split", "2")
            tests = sum(report["summary"].values())
            rows = system.recorded(report["run_id"], tests)
            bound = sum(r["duration_s"] or 0.0 for r in rows) / 2
            print(f"dtf first run: {first:.1f}s ({tests} tests, {len(report['tasks'])} shards)", flush=True)
            warm_run, _ = system.submit(suite, "--split", "2")
        finally:
            system.stop()
        print(f"{args.package}: pytest -n 2 {xdist:.1f}s; dtf --split 2 first run {first:.1f}s, "
              f"warm history {warm_run:.1f}s; lower bound (recorded test time / 2) {bound:.1f}s")
        print(f"ratios: dtf first / xdist = {first / xdist:.2f}, dtf warm / xdist = {warm_run / xdist:.2f}, "
              f"dtf warm / lower bound = {warm_run / bound:.2f}")


if __name__ == "__main__":
    main()
