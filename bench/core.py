"""End-to-end task throughput and replay speed, each beside raw nats-py measured in the same run.

    python bench/core.py [--tasks 300] [--workers 2] [--concurrency 1] [--history 20000]

Starts `dtf up --workers 0` on a temp dir plus N `dtf worker` processes, submits no-op command tasks
(`true`) and times submit -> every task terminal. Then, on the same server: raw nats-py JetStream
publishes (one awaited ack at a time, and pipelined) and a raw ordered-consumer read of DTF_EVENTS,
beside dtf's own replay paths (the pure fold, and a DuckDB rebuild). Prints rates and ratios; the
machine is shared and noisy, so compare ratios, not absolute numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from nats.js.api import StreamConfig

from dtf.cli import submit as sub
from dtf.projections.rebuild import rebuild
from dtf.spec import Requirements, TaskSpec
from dtf.state import Fold
from dtf.streams import bus, topology


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dtf", *args], stdout=subprocess.PIPE,
                            stderr=log.open("ab"), env=env, text=True)


@contextlib.contextmanager
def local_system(scratch: Path, workers: int, concurrency: int,
                 worker_args: tuple[str, ...] = ()) -> Iterator[tuple[str, list[subprocess.Popen]]]:
    """`dtf up` without its own workers (no auth, no dashboard) and `workers` bench workers: the URL and
    every process (for CPU accounting); all stopped with SIGTERM afterwards, the workers first."""
    env = {**os.environ, "XDG_STATE_HOME": str(scratch / "state")}
    up = start(["up", "--workers", "0", "--data-dir", str(scratch / "d"), "--nats-port", str(free_port()),
                "--no-dashboard", "--no-auth"], scratch / "up.log", env)
    url = up.stdout.readline().strip().split("=", 1)[1]
    processes = [start(["worker", "--nats", url, "--id", f"bench-{i}", "--concurrency", str(concurrency),
                        "--cache-dir", str(scratch / "cache"), *worker_args], scratch / f"worker{i}.log", env)
                 for i in range(workers)]
    try:
        yield url, [*processes, up]
    finally:  # the workers first: each publishes WorkerLeft, which needs the server up
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(90)
        up.send_signal(signal.SIGTERM)
        up.wait(60)


async def end_to_end(url: str, tasks: int) -> float:
    nc = await bus.connect(url, name="bench")
    js = nc.jetstream()
    run_id = sub.new_run_id()
    specs = [TaskSpec(type="command", config={"command": "true"})] * tasks
    started = time.perf_counter()
    await sub.submit_run(js, sub.submissions(run_id, specs, "bench", "bench"))
    final = await sub.follow_run(js, run_id)
    elapsed = time.perf_counter() - started
    assert all(t.status == "passed" for t in final), {t.status for t in final}
    await nc.close()
    return tasks / elapsed


async def raw_rates(url: str, count: int) -> dict[str, float]:
    nc = await bus.connect(url, name="bench-raw")
    js = nc.jetstream()
    await js.add_stream(StreamConfig(name="BENCH_RAW", subjects=["bench.raw.>"]))
    payload = b"x" * 600  # about a TaskSubmitted's size
    started = time.perf_counter()
    for i in range(count):
        await js.publish(f"bench.raw.{i}", payload, headers={"Nats-Msg-Id": f"s{i}"})
    sync_rate = count / (time.perf_counter() - started)
    started = time.perf_counter()
    futures = [await js.publish_async(f"bench.raw.{i}", payload, headers={"Nats-Msg-Id": f"p{i}"})
               for i in range(count)]
    await asyncio.gather(*futures)
    pipelined_rate = count / (time.perf_counter() - started)
    await nc.close()
    return {"raw sync publish": sync_rate, "raw pipelined publish": pipelined_rate}


async def replay_rates(url: str, scratch: Path, history: int) -> dict[str, float]:
    nc = await bus.connect(url, name="bench-replay")
    js = nc.jetstream()
    # A longer history to replay: submissions no worker here can take (they stay pending).
    parked = TaskSpec(type="command", config={"command": "true"}, requirements=Requirements(hardware=["rocm"]))
    await bus.publish_many(js, sub.submissions(sub.new_run_id(), [parked] * history, "bench", "bench"))
    events = (await js.stream_info(topology.EVENTS)).state.messages
    started = time.perf_counter()
    n = 0
    async for _ in bus.read(js, topology.EVENTS, ["dtf.>"]):
        n += 1
    raw = n / (time.perf_counter() - started)
    fold = Fold()
    started = time.perf_counter()
    async for msg in bus.read(js, topology.EVENTS, ["dtf.>"]):
        fold.apply(msg.subject, msg.seq, msg.data)
    folded = events / (time.perf_counter() - started)
    started = time.perf_counter()
    await rebuild(js, scratch / "rebuilt.duckdb")
    rebuilt = events / (time.perf_counter() - started)
    await nc.close()
    return {"events in log": events, "raw ordered consumer read": raw, "dtf replay (fold)": folded,
            "dtf replay --db (DuckDB rebuild)": rebuilt}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--history", type=int, default=20_000, help="extra events to replay")
    opts = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dtf-bench-"))
    with local_system(scratch, opts.workers, opts.concurrency) as (url, _):
        e2e = asyncio.run(end_to_end(url, opts.tasks))
        raw = asyncio.run(raw_rates(url, opts.tasks * 4))
        replay = asyncio.run(replay_rates(url, scratch, opts.history))
    results = {"end-to-end no-op tasks/s": e2e, **raw, **replay}
    width = max(map(len, results))
    for name, value in results.items():
        print(f"{name:<{width}}  {value:>12,.0f}")
    print(f"{'end-to-end / raw sync publish':<{width}}  {e2e / raw['raw sync publish']:>12.3f}")
    print(f"{'fold replay / raw ordered read':<{width}}  {replay['dtf replay (fold)'] / replay['raw ordered consumer read']:>12.3f}")
    print(f"{'DuckDB rebuild / raw ordered read':<{width}}  "
          f"{replay['dtf replay --db (DuckDB rebuild)'] / replay['raw ordered consumer read']:>12.3f}")
    print(json.dumps({k: round(v, 1) for k, v in results.items()}))


if __name__ == "__main__":
    main()
