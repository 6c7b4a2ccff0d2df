"""What one Prometheus scrape costs on a big history, beside a peer measured in the same run.

    python bench/metrics.py [--tasks 100000]

Coordinator: one scrape (the fold's tasks, queue and workers turned into metric families) beside
folding the same events once. Projector: one scrape of a read model with that many tasks and
attempts and four ledger events per task, beside one page of `dtf tasks` on the same database.
No server: both collectors' pure parts run on data made here. Compare the ratios, not the times.
"""

from __future__ import annotations

import argparse
import time
from datetime import UTC, datetime

from dtf import events as ev
from dtf.cli.coordinator_metrics import fold_families
from dtf.projections.metrics import ProjectorCollector
from dtf.projections.projection import Projection
from dtf.spec import Requirements, TaskSpec
from dtf.state import Fold

NOW = datetime(2026, 1, 1, tzinfo=UTC)
REPEAT = 5
CLASSES = [Requirements(), Requirements(hardware=["cuda"]),
           Requirements(hardware=["cuda"], min_cuda_compute=8), Requirements(tags={"rack": "b"})]


def per_call(fn) -> float:  # noqa: ANN001
    start = time.perf_counter()
    for _ in range(REPEAT):
        fn()
    return (time.perf_counter() - start) / REPEAT


def coordinator(tasks: int) -> None:
    """Every task queued (the worst case for the queue-depth tally)."""
    events: list[ev.Event] = [
        ev.WorkerRegistered(worker_id=f"w{i}", host="h", pid=i, concurrency=4, time=NOW) for i in range(20)]
    events += [
        ev.TaskSubmitted(run_id="r", task_id=f"t{i}", submitter="me", time=NOW, spec=TaskSpec(
            type="command", config={"command": "true"}, requirements=CLASSES[i % len(CLASSES)]))
        for i in range(tasks)
    ]
    fold = Fold()
    start = time.perf_counter()
    for event in events:
        fold.apply_event(event)
    folding = time.perf_counter() - start

    def scrape() -> None:
        busy = {w: len(ids) for w, ids in list(fold.active.items())}
        list(fold_families(list(fold.tasks.values()), list(fold.workers.values()), busy, NOW))

    scraping = per_call(scrape)
    print(f"coordinator, {tasks} queued tasks: fold once {folding:.3f} s, "
          f"one scrape {scraping * 1000:.1f} ms = {scraping / folding:.1%} of the fold")


def projector(tasks: int) -> None:
    projection = Projection.open(":memory:")
    con = projection.con
    start = "TIMESTAMPTZ '2026-01-01 00:00:00+00'"
    con.execute(f"INSERT INTO tasks (task_id, run_id, type, status, submitted_at) "
                f"SELECT 't' || i, 'r', 'command', 'passed', {start} FROM range({tasks}) t(i)")
    con.execute(f"INSERT INTO attempts (task_id, attempt, run_id, worker_id, status, started_at, duration_s) "
                f"SELECT 't' || i, 1, 'r', 'w', 'passed', {start} + to_seconds(i % 600), (i % 1000) / 10.0 "
                f"FROM range({tasks}) t(i)")
    types = "['TaskSubmitted', 'TaskAssigned', 'TaskStarted', 'ResultReported']"
    con.execute(f"INSERT INTO events SELECT 'DTF_EVENTS', i, 'e' || i, 's', ({types})[i % 4 + 1], {start}, "
                f"true FROM range({4 * tasks}) t(i)")
    collector = ProjectorCollector(projection, js=None, loop=None)  # type: ignore[arg-type] - no bus here
    tails = {"DTF_EVENTS": 4 * tasks, "DTF_HEARTBEATS": 0}

    def scrape() -> None:
        cur = con.cursor()
        list(collector._families(cur, tails))  # noqa: SLF001 - the scrape minus the bus
        cur.close()

    def tasks_page() -> None:
        con.execute("SELECT * FROM tasks ORDER BY submitted_at, task_id LIMIT 1000").fetchall()

    scraping, page = per_call(scrape), per_call(tasks_page)
    print(f"projector, {tasks} tasks and attempts, {4 * tasks} ledger events: "
          f"one scrape {scraping * 1000:.1f} ms, one `dtf tasks` page {page * 1000:.1f} ms "
          f"= {scraping / page:.1f}x")
    projection.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=100_000)
    args = parser.parse_args()
    coordinator(args.tasks)
    projector(args.tasks)


if __name__ == "__main__":
    main()
