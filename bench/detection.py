"""Detection quality: the river detector against a plain z-score baseline on the same series.

    python bench/detection.py [--series 300] [--runs 60] [--seed 1]

Generates benchmark series with known ground truth: a level (1 to 1000), noise of 0.5-4 % (CV),
seasonality in some (period 7 or 12), occasional outliers (2 % of runs, 20-60 % off), and half of
them with one level shift for the worse of 5, 10 or 20 % at a known run (25 to runs-15). Latencies
(lower is better) and throughputs (higher is better), on cpu and cuda workers. Every run of every
series is published as TaskSubmitted / TaskAssigned / ResultReported through a real nats-server
(run by run, as CI would), the detector service follows the stream, and its RegressionDetected and
AnomalyDetected events are read back from the log and scored:

* recall per step size: shifted series with a regression within 15 runs of the shift;
* false-alarm series: series with a regression where there is no shift (before it, or none at all);
* median delay: runs from the shift to the result that completed the detection;
* precision / F1 over series; outliers found (an AnomalyDetected on an injected outlier).

The baseline is the seeds' method on the same values: a run is a regression when its z-score
against the previous 20 runs is beyond 3 in the worse direction (it needs no server, so it runs on
the generated values directly).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

from dtf import events as ev
from dtf import subjects
from dtf.projections.detection import Settings, better_for
from dtf.projections.detector import Follower, run_detector
from dtf.spec import TaskSpec
from dtf.streams import bus, topology
from dtf.streams.server import EmbeddedServer

T0 = datetime(2025, 1, 1, tzinfo=UTC)
STEPS = (0.05, 0.10, 0.20)
WINDOW = 15
"""A detection counts for a shift up to this many runs after it."""
WORKERS = {"w-cpu": ["cpu"], "w-cuda": ["cpu", "cuda"]}


@dataclass
class Series:
    index: int
    metric: str
    worker: str
    values: list[float]
    step: float = 0.0
    change: int | None = None
    outliers: set[int] = field(default_factory=set)

    @property
    def name(self) -> str:
        return f"bench-{self.index:03d}"

    @property
    def lower_is_better(self) -> bool:
        return better_for(self.metric) == "lower"


def generate(count: int, runs: int, seed: int) -> list[Series]:
    made = []
    for index in range(count):
        rng = random.Random(seed * 1_000_003 + index)
        metric = "latency_ms" if rng.random() < 0.6 else "samples_per_s"
        level = 10 ** rng.uniform(0, 3)
        noise = rng.uniform(0.005, 0.04)
        period = rng.choice((7, 12)) if rng.random() < 0.4 else 0
        amplitude = rng.uniform(0.5, 1.5) * noise if period else 0.0
        phase = rng.uniform(0, 2 * math.pi)
        series = Series(index, metric, rng.choice(sorted(WORKERS)), [])
        if index % 2:
            series.step = STEPS[(index // 2) % len(STEPS)]
            series.change = rng.randint(25, runs - WINDOW)
        worse = 1.0 if series.lower_is_better else -1.0
        for run in range(runs):
            value = level * (1 + rng.gauss(0, noise))
            if period:
                value *= 1 + amplitude * math.sin(2 * math.pi * run / period + phase)
            if series.change is not None and run >= series.change:
                value *= 1 + worse * series.step
            if rng.random() < 0.02 and run > 5:
                series.outliers.add(run)
                value *= 1 + rng.choice((-1, 1)) * rng.uniform(0.2, 0.6)
            series.values.append(value)
        made.append(series)
    return made


def events_for(all_series: list[Series], runs: int) -> list[ev.Event]:
    """The workers, then run by run every series' benchmark submitted, assigned and reported."""
    events: list[ev.Event] = [
        ev.WorkerRegistered(id=f"{worker}-registered", time=T0, worker_id=worker, host=worker, pid=1,
                            capabilities=ev.Capabilities(hardware=hardware))
        for worker, hardware in sorted(WORKERS.items())
    ]
    for run in range(runs):
        run_id = f"r{run:03d}"
        for series in all_series:
            task_id, at = f"s{series.index:03d}-{run_id}", T0 + timedelta(hours=run, seconds=series.index)
            spec = TaskSpec(type="benchmark", name=series.name, config={"command": "python bench.py"})
            events += [
                ev.TaskSubmitted(id=f"{task_id}-sub", time=at, run_id=run_id, task_id=task_id, submitter="ci",
                                 spec=spec),
                ev.TaskAssigned(id=f"{task_id}-asg", time=at, run_id=run_id, task_id=task_id, attempt=1,
                                worker_id=series.worker, coordinator="c1", spec=spec),
                ev.ResultReported(id=f"{task_id}-res", time=at + timedelta(minutes=1), run_id=run_id,
                                  task_id=task_id, attempt=1, worker_id=series.worker, outcome="passed",
                                  metrics={series.metric: series.values[run]}),
            ]
    return events


def zscore_baseline(series: Series, window: int = 20, limit: float = 3.0) -> list[int]:
    """Runs the seeds' z-score method calls regressions."""
    flagged = []
    for run in range(10, len(series.values)):
        past = series.values[max(0, run - window):run]
        spread = statistics.stdev(past) or 1e-12
        z = (series.values[run] - statistics.fmean(past)) / spread
        if (z if series.lower_is_better else -z) > limit:
            flagged.append(run)
    return flagged


@dataclass
class Score:
    hits: dict[float, int] = field(default_factory=lambda: dict.fromkeys(STEPS, 0))
    delays: list[int] = field(default_factory=list)
    false_series: int = 0

    def add(self, series: Series, regressions: list[int]) -> None:
        if series.change is not None:
            found = [r for r in regressions if series.change <= r <= series.change + WINDOW]
            if found:
                self.hits[series.step] += 1
                self.delays.append(found[0] - series.change)
        if any(series.change is None or r < series.change for r in regressions):
            self.false_series += 1

    def row(self, name: str, all_series: list[Series]) -> str:
        shifted = {step: sum(s.step == step for s in all_series) for step in STEPS}
        recall = {step: self.hits[step] / max(shifted[step], 1) for step in STEPS}
        tp = sum(self.hits.values())
        precision = tp / max(tp + self.false_series, 1)
        overall = tp / max(sum(shifted.values()), 1)
        f1 = 2 * precision * overall / max(precision + overall, 1e-12)
        delay = statistics.median(self.delays) if self.delays else float("nan")
        return (f"| {name:<22} | {recall[0.05]:>5.2f} | {recall[0.10]:>5.2f} | {recall[0.20]:>5.2f} "
                f"| {self.false_series / len(all_series):>11.3f} | {delay:>12.1f} | {precision:>9.3f} "
                f"| {f1:>5.3f} |")


async def detect(all_series: list[Series], runs: int) -> tuple[dict[int, list[int]], dict[int, list[int]], dict]:
    """Publish everything through a real nats-server, run the detector until it has read it all,
    and return (regression runs, anomaly runs) per series index, with timings."""
    events = events_for(all_series, runs)
    with tempfile.TemporaryDirectory() as scratch, EmbeddedServer(Path(scratch) / "nats") as server:
        nc = await bus.connect(server.url, name="bench-detection")
        js = nc.jetstream()
        await topology.provision(js)
        started = time.perf_counter()
        await bus.publish_many(js, events)
        published = time.perf_counter() - started
        stop, follower = asyncio.Event(), Follower()
        started = time.perf_counter()
        task = asyncio.create_task(run_detector(nc, stop, follower=follower))
        while True:
            last = (await js.stream_info(topology.EVENTS)).state.last_seq
            if follower.last_seq >= last and not follower.due:
                break
            await asyncio.sleep(0.1)
        detected = time.perf_counter() - started
        stop.set()
        await task
        regressions: dict[int, list[int]] = {}
        anomalies: dict[int, list[int]] = {}
        async for message in bus.read(js, topology.EVENTS, [subjects.task("*", "*", "*", subjects.DETECTOR)]):
            event = ev.decode(message.data)
            assert isinstance(event, ev.Detection)
            index, run = int(event.benchmark.removeprefix("bench-")), int(event.run_id.removeprefix("r"))
            target = regressions if isinstance(event, ev.RegressionDetected) else anomalies
            target.setdefault(index, []).append(run)
        await nc.close()
    return regressions, anomalies, {"events": len(events), "publish_s": published, "detect_s": detected}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=300)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    all_series = generate(args.series, args.runs, args.seed)
    regressions, anomalies, timing = asyncio.run(detect(all_series, args.runs))

    river, baseline = Score(), Score()
    for series in all_series:
        river.add(series, regressions.get(series.index, []))
        baseline.add(series, zscore_baseline(series))
    injected = sum(len(s.outliers) for s in all_series)
    found = sum(len(s.outliers & set(anomalies.get(s.index, []))) for s in all_series)
    flagged = sum(len(v) for v in anomalies.values())

    print(f"{len(all_series)} series x {args.runs} runs (seed {args.seed}); "
          f"{sum(s.change is not None for s in all_series)} shifted, {injected} outliers injected; "
          f"detector {Settings().shift_detector}")
    print("| method                 | r 5 % | r10 % | r20 % | false-alarm | median delay | precision |  F1   |")
    print("|------------------------|-------|-------|-------|-------------|--------------|-----------|-------|")
    print(river.row("river (dtf detector)", all_series))
    print(baseline.row("z-score baseline", all_series))
    print(f"outliers: {found}/{injected} injected found by AnomalyDetected, {flagged - found} other anomalies")
    print(f"{timing['events']} events published in {timing['publish_s']:.1f}s; the detector read and judged "
          f"them in {timing['detect_s']:.1f}s ({timing['events'] / timing['detect_s']:.0f} events/s)")


if __name__ == "__main__":
    sys.exit(main())
