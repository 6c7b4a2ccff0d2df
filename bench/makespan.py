"""A real public suite split by dtf against `pytest -n 2`, in one run on this machine.

    pip install networkx pytest-xdist    # the suite (its tests ship in the wheel) and the peer
    python bench/makespan.py [--package networkx] [--no-serial]

The package's installed directory (networkx 3.6: 6,890 tests, about 105 s serially here) is copied
to a scratch directory and run (a) by `pytest -n 2` there, (b) by `dtf up --workers 2` with
`dtf submit DIR --split 2 --wait`: a first run with no history (which collects the suite at
submit), then a warm-history run (collection cached by content, durations from the first run),
then one after a one-line edit, as CI sees each commit (history, but the collection again).
Two lower bounds for 2 workers: the recorded test time / 2 (pytest's per-test durations, so
without importing the modules or pytest's own per-test work), and, unless --no-serial, one plain
`pytest` process's wall time / 2 (all of the suite's work, perfectly halved). Prints wall times and
ratios; nothing is asserted.
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
    parser.add_argument("--no-serial", action="store_true", help="skip the serial pytest run (a second bound)")
    args = parser.parse_args()
    installed = Path(importlib.import_module(args.package).__file__).parent
    with tempfile.TemporaryDirectory(prefix="dtf-bench-makespan-") as tmp:
        scratch = Path(tmp)
        suite = scratch / args.package
        shutil.copytree(installed, suite, ignore=shutil.ignore_patterns("__pycache__"))
        pytest = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
        xdist = timed([*pytest, "-n", "2", "."], suite)
        print(f"pytest -n 2: {xdist:.1f}s", flush=True)
        serial = None if args.no_serial else timed([*pytest, "."], suite)
        if serial is not None:
            print(f"pytest (serial): {serial:.1f}s", flush=True)
        system = System(scratch)
        try:
            first, report = system.submit(suite, "--split", "2")
            tests = sum(report["summary"].values())
            rows = system.recorded(report["run_id"], tests)
            bound = sum(r["duration_s"] or 0.0 for r in rows) / 2
            print(f"dtf first run: {first:.1f}s ({tests} tests, {len(report['tasks'])} shards)", flush=True)
            warm_run, _ = system.submit(suite, "--split", "2")
            print(f"dtf warm history: {warm_run:.1f}s", flush=True)
            edited = next(iter(sorted(suite.rglob("test_*.py"))))
            edited.write_text(edited.read_text() + "\n# a commit later\n")  # as CI sees each commit
            changed, _ = system.submit(suite, "--split", "2")
        finally:
            system.stop()
        print(f"{args.package}: pytest -n 2 {xdist:.1f}s; dtf --split 2 first run {first:.1f}s, "
              f"warm history {warm_run:.1f}s, history but a changed tree {changed:.1f}s; "
              f"lower bound (recorded test time / 2) {bound:.1f}s")
        print(f"ratios: dtf first / xdist = {first / xdist:.2f}, dtf warm / xdist = {warm_run / xdist:.2f}, "
              f"dtf changed tree / xdist = {changed / xdist:.2f}, dtf warm / lower bound = {warm_run / bound:.2f}")
        if serial is not None:
            print(f"serial pytest / 2 = {serial / 2:.1f}s: dtf warm / that = {warm_run / (serial / 2):.2f}, "
                  f"pytest -n 2 / that = {xdist / (serial / 2):.2f}")


if __name__ == "__main__":
    main()
