"""Dispatch speed: no-op command tasks end to end, beside raw nats-py JetStream publishes in the same run.

    python bench/dispatch.py [--tasks 10000] [--workers 2] [--concurrency 4] [--paced 300] [--rate 100]

Starts `dtf up --workers 0` on a temp dir plus N `dtf worker` processes, waits for them to register,
then:
  throughput  submits --tasks `true` commands at once (pipelined, as `dtf submit --spec LIST` does) and
              follows the log: submit rate, time until every task is assigned, time until every
              result is stored, tasks/s and events/s end to end;
  scheduler   the pure `schedule.decide` round with 10 and with --tasks queued tasks (a round must
              not grow with the queue);
  latency     submits --paced tasks one at a time at --rate per second and reports p50/p99 of
              TaskSubmitted -> TaskStarted (both stamped on this machine's clock);
  peers       raw nats-py pipelined JetStream publishes of as many messages as the throughput phase
              stored, on the same server, and raw asyncio spawns of `true` with as many at once as
              the workers have slots: dtf's rates as ratios of both.
The machine is shared and noisy: compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
from core import local_system
from nats.js.api import StreamConfig

from dtf import events as ev
from dtf import schedule, subjects
from dtf.cli import submit as sub
from dtf.spec import TaskSpec
from dtf.state import Fold
from dtf.streams import bus, topology

NOOP = TaskSpec(type="command", config={"command": "true"})


async def registered(js, count: int) -> None:
    seen: set[str] = set()
    async for msg in bus.read(js, topology.EVENTS, [subjects.WORKERS], follow=True):
        event = ev.decode(msg.data)
        if isinstance(event, ev.WorkerRegistered):
            seen.add(event.worker_id)
            if len(seen) >= count:
                return


async def throughput(js, tasks: int) -> dict[str, float]:
    run_id = sub.new_run_id()
    first_seq = (await js.stream_info(topology.EVENTS)).state.last_seq + 1
    marks: dict[str, float] = {}

    async def follow() -> None:
        assigned = done = 0
        async for msg in bus.read(js, topology.EVENTS, [subjects.run_all(run_id)], follow=True, start_seq=first_seq):
            kind = subjects.parse(msg.subject).kind
            if kind == "assigned":
                assigned += 1
                if assigned == tasks:
                    marks["assigned"] = time.perf_counter()
            elif kind in ("result", "failed"):
                done += 1
                if done == tasks:
                    marks["done"] = time.perf_counter()
                    return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.2)  # the follower's consumer is in place
    began = time.perf_counter()
    await sub.submit_run(js, sub.submissions(run_id, [NOOP] * tasks, "bench", "bench"))
    submitted = time.perf_counter()
    await follower
    events = (await js.stream_info(topology.EVENTS)).state.last_seq + 1 - first_seq
    elapsed = marks["done"] - began
    return {
        "tasks": tasks, "events stored": events,
        "submit: tasks/s": tasks / (submitted - began),
        "seconds until all assigned": marks["assigned"] - began,
        "seconds until all done": elapsed,
        "end to end: tasks/s": tasks / elapsed,
        "end to end: events/s": events / elapsed,
    }


async def latency(js, count: int, rate: float) -> dict[str, float]:
    run_id = sub.new_run_id()
    first_seq = (await js.stream_info(topology.EVENTS)).state.last_seq + 1
    submitted_at: dict[str, float] = {}
    waits: list[float] = []

    async def follow() -> None:
        async for msg in bus.read(js, topology.EVENTS, [subjects.run_all(run_id)], follow=True, start_seq=first_seq):
            event = ev.decode(msg.data)
            if isinstance(event, ev.TaskSubmitted):
                submitted_at[event.task_id] = event.time.timestamp()
            elif isinstance(event, ev.TaskStarted):
                waits.append(event.time.timestamp() - submitted_at[event.task_id])
                if len(waits) == count:
                    return

    follower = asyncio.create_task(follow())
    await asyncio.sleep(0.2)
    began = time.perf_counter()
    for i, event in enumerate(sub.submissions(run_id, [NOOP] * count, "bench", "bench")):
        await asyncio.sleep(max(0.0, began + i / rate - time.perf_counter()))
        await bus.publish(js, msgspec_fresh(event))
    await follower
    waits.sort()
    return {f"submit->start p50 ms at {rate:g}/s": 1000 * statistics.median(waits),
            f"submit->start p99 ms at {rate:g}/s": 1000 * waits[min(len(waits) - 1, int(0.99 * len(waits)))]}


def msgspec_fresh(event: ev.TaskSubmitted) -> ev.TaskSubmitted:
    """Stamped when it is sent, not when the list was built."""
    return ev.TaskSubmitted(id=event.id, run_id=event.run_id, task_id=event.task_id, submitter=event.submitter,
                            project=event.project, spec=event.spec)


async def raw_publish(js, count: int) -> float:
    await js.add_stream(StreamConfig(name="BENCH_RAW", subjects=["bench.raw.>"]))
    payload = b"x" * 600  # about a TaskSubmitted's size
    began = time.perf_counter()
    window = []
    for i in range(count):
        window.append(await js.publish_async(f"bench.raw.{i}", payload, headers={"Nats-Msg-Id": f"p{i}"}))
        if len(window) >= 512:
            await asyncio.gather(*window)
            window.clear()
    await asyncio.gather(*window)
    return count / (time.perf_counter() - began)


async def raw_spawn(count: int, slots: int) -> float:
    """`true` run by asyncio in its own session, `slots` at once: the most a machine this busy could
    give no-op tasks with no bus, scheduler or bookkeeping at all."""
    gate = asyncio.Semaphore(slots)

    async def one() -> None:
        async with gate:
            process = await asyncio.create_subprocess_exec("true", start_new_session=True)
            await process.wait()

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(count)))
    return count / (time.perf_counter() - began)


def round_cost(queued: int, slots: int = 8, rounds: int = 200) -> float:
    """Seconds per scheduling round (`schedule.decide`, pure) with `queued` no-op tasks waiting and
    one of `slots` free, as when a task finishes while a long queue waits."""
    fold = Fold()
    at = ev.now()
    fold.apply_event(ev.WorkerRegistered(id="reg", time=at, worker_id="w", host="h", pid=0, concurrency=slots))
    for i in range(queued):
        fold.apply_event(ev.TaskSubmitted(id=f"s{i}", time=at, run_id="r", task_id=f"t{i}", submitter="b", spec=NOOP))
    for decision in list(schedule.decide(fold, at, "bench"))[:slots - 1]:
        fold.apply_event(decision)
    began = time.perf_counter()
    for _ in range(rounds):
        assert len(list(schedule.decide(fold, at, "bench"))) == 1
    return (time.perf_counter() - began) / rounds


async def measure(url: str, opts) -> dict[str, float]:
    nc = await bus.connect(url, name="bench-dispatch")
    js = nc.jetstream()
    try:
        await asyncio.wait_for(registered(js, opts.workers), 60)
        results = await throughput(js, opts.tasks)
        if opts.paced:
            results |= await latency(js, opts.paced, opts.rate)
        results["raw pipelined publish: msgs/s"] = await raw_publish(js, int(results["events stored"]))
        results["raw spawn of `true`: /s"] = await raw_spawn(min(opts.tasks, 2000), opts.workers * opts.concurrency)
    finally:
        await nc.close()
    return results


def cpu_seconds(processes: list) -> dict[str, float]:
    """CPU time so far of each process we started and theirs (coordinator, projector, nats-server)."""
    spent: dict[str, float] = {}
    for process in processes:
        parent = psutil.Process(process.pid)
        for p in [parent, *parent.children(recursive=True)]:
            try:
                args = p.cmdline()
                times = p.cpu_times()
            except psutil.Error:
                continue
            name = next((a for a in args if a in ("up", "worker", "coordinator", "projector", "detector", "dashboard")), p.name())
            spent[name] = spent.get(name, 0.0) + times.user + times.system
    return spent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=10_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--paced", type=int, default=300, help="tasks for the latency phase (0: skip it)")
    parser.add_argument("--rate", type=float, default=100.0, help="submissions per second in the latency phase")
    parser.add_argument("--isolate", choices=("auto", "on", "off"), default="auto",
                        help="the workers' task isolation (off: the cost without it)")
    opts = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dtf-dispatch-"))
    with local_system(scratch, opts.workers, opts.concurrency, ("--isolate", opts.isolate)) as (url, processes):
        results = asyncio.run(measure(url, opts))
        cpu = cpu_seconds(processes)
    small, large = round_cost(10), round_cost(opts.tasks)
    results |= {"decide ms/round, 10 queued": 1000 * small, f"decide ms/round, {opts.tasks} queued": 1000 * large,
                "decide round: long queue / short queue": large / small}
    raw = results["raw pipelined publish: msgs/s"]
    results["end-to-end events/s / raw msgs/s"] = results["end to end: events/s"] / raw
    results["end-to-end tasks/s / raw msgs/s"] = results["end to end: tasks/s"] / raw
    results["end-to-end tasks/s / raw spawns/s"] = results["end to end: tasks/s"] / results["raw spawn of `true`: /s"]
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:>12,.3f}" if value < 10 else f"{name:<{width}}  {value:>12,.0f}")
    print("CPU seconds by process (the whole run): " + ", ".join(f"{name} {sec:.1f}" for name, sec in cpu.items()))
    print(f"(logs in {scratch}; {opts.workers} workers x {opts.concurrency} slots, --isolate {opts.isolate}; python {sys.version.split()[0]})")
    print(json.dumps({k: round(v, 3) for k, v in results.items()}))


if __name__ == "__main__":
    main()
