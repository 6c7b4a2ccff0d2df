"""Replay a recorded suite through the pure scheduler on virtual workers: makespan against its lower bound.

    python bench/simulate.py [--suite bench/data/recorded_suite.json] [--workers 8 32 128] [--copies 1]

Each recorded test becomes one task; W virtual workers (one slot each) register; then, in virtual time,
`schedule.decide` runs at the start and after every completion, exactly as the coordinator would on
the folded log, and each assigned task completes its recorded duration later. No server, no clock:
the same fold and decide the coordinator uses, driven by events this script makes up. Two submission
orders: as recorded (file order) and longest first (what history-based splitting aims at). Prints
makespan, lower bound = max(total / workers, longest task) and their ratio. `--copies N` submits the
suite N times (a longer queue), and the decide cost per round shows the hot path stays cheap.
"""

from __future__ import annotations

import argparse
import heapq
import json
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dtf import events as ev
from dtf import schedule
from dtf.spec import TaskSpec
from dtf.state import Fold

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = schedule.Policy(heartbeat_timeout=timedelta(days=3650))
"""Virtual workers never heartbeat; they are never lost."""


def simulate(durations: list[float], workers: int) -> tuple[float, float, int]:
    """(makespan in seconds, seconds spent in decide, rounds) for tasks submitted in this order."""
    fold = Fold()
    for n in range(workers):
        fold.apply_event(ev.WorkerRegistered(id=f"reg-{n}", time=T0, worker_id=f"v{n:03d}", host="sim", pid=0))
    spec = TaskSpec(type="command", config={"command": "true"})
    for i in range(len(durations)):
        fold.apply_event(ev.TaskSubmitted(id=f"s{i}", time=T0, run_id="sim", task_id=f"t{i:06d}",
                                          submitter="sim", spec=spec))
    running: list[tuple[float, str, str]] = []  # (finish time, task id, worker id)
    now = 0.0
    deciding, rounds = 0.0, 0
    while True:
        began = time.perf_counter()
        decisions = list(schedule.decide(fold, T0 + timedelta(seconds=now), "sim", POLICY))
        deciding += time.perf_counter() - began
        rounds += 1
        for d in decisions:
            assert isinstance(d, ev.TaskAssigned), d
            fold.apply_event(d)
            heapq.heappush(running, (now + durations[int(d.task_id[1:])], d.task_id, d.worker_id))
        if not running:
            break
        now, task_id, worker_id = heapq.heappop(running)
        finished = [(task_id, worker_id)]
        while running and running[0][0] == now:
            _, task_id, worker_id = heapq.heappop(running)
            finished.append((task_id, worker_id))
        for task_id, worker_id in finished:
            fold.apply_event(ev.ResultReported(
                id=f"r-{task_id}", time=T0 + timedelta(seconds=now), run_id="sim", task_id=task_id, attempt=1,
                worker_id=worker_id, outcome="passed", duration_s=durations[int(task_id[1:])]))
    assert all(t.status == "passed" for t in fold.tasks.values())
    return now, deciding, rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", type=Path, default=Path(__file__).parent / "data" / "recorded_suite.json")
    parser.add_argument("--workers", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--copies", type=int, default=1)
    opts = parser.parse_args()
    recorded = json.loads(opts.suite.read_text())
    durations = [t["duration_s"] for t in recorded["tests"]] * opts.copies
    total, longest = sum(durations), max(durations)
    print(f"suite: {opts.suite.name} x{opts.copies}: {len(durations)} tests, {total:,.1f} s in all, longest {longest:.1f} s")
    print(f"{'workers':>7}  {'order':<14} {'makespan s':>10}  {'bound s':>8}  {'ratio':>6}  {'decide us/round':>15}")
    for workers in opts.workers:
        bound = max(total / workers, longest)
        for order, tasks in (("as recorded", durations), ("longest first", sorted(durations, reverse=True))):
            makespan, deciding, rounds = simulate(tasks, workers)
            print(f"{workers:>7}  {order:<14} {makespan:>10,.1f}  {bound:>8,.1f}  {makespan / bound:>6.3f}  "
                  f"{1e6 * deciding / rounds:>15,.0f}")


if __name__ == "__main__":
    main()
