"""What durability costs: R1 vs R3, JetStream's default fsync policy vs `sync_interval: always`.

    python bench/durability.py [--sync-msgs 3000] [--pipelined-msgs 15000] [--rounds 3] [--budget 2.5]

For each setup (a standalone node for R1, a 3-node loopback Cluster for R3; each with the server's
default sync_interval, i.e. fsync every 2 minutes, and with `sync_interval: always`, i.e. fsync
before every ack) it creates a file-stored stream and measures, with nats-py, 600-byte messages
(about a TaskSubmitted's size):

  sync publish       one publish at a time, each ack awaited (a lone writer's latency-bound rate)
  pipelined publish  publish_async with up to 512 in flight, every ack awaited (dtf's publish_many)

The client connects to the stream leader (a client on a follower adds one loopback hop). Every
loop is bounded by a message count and a time budget; everything binds 127.0.0.1 on free ports and
lives in a temp dir that is removed afterwards. Prints msg/s per setup, the ratios that matter and
one JSON line. The machine is shared and noisy: compare the ratios from one run, not absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from nats.js.api import StorageType, StreamConfig

from dtf.streams import bus
from dtf.streams.cluster import Cluster
from dtf.streams.server import EmbeddedServer

PAYLOAD = b"x" * 600
STREAM = "BENCH_DURABILITY"
WINDOW = 512


@dataclass(frozen=True)
class Setup:
    replicas: int
    sync_interval: str | None  # None: the server default (2 min)

    @property
    def label(self) -> str:
        return f"R{self.replicas} sync_interval={self.sync_interval or 'default(2m)'}"


SETUPS = [Setup(1, None), Setup(1, "always"), Setup(3, None), Setup(3, "always")]


class Servers:
    """A standalone node (R1) or a 3-node cluster (R3) with the given sync_interval."""

    def __init__(self, setup: Setup, root: Path) -> None:
        self.setup = setup
        self.root = root
        self.single: EmbeddedServer | None = None
        self.cluster: Cluster | None = None

    def start(self) -> list[str]:
        if self.setup.replicas == 1:
            extra: list[str] = []
            if self.setup.sync_interval:
                config = self.root / "r1.conf"
                self.root.mkdir(parents=True, exist_ok=True)
                config.write_text(f"jetstream {{\n  sync_interval: {self.setup.sync_interval}\n}}\n")
                extra = ["-c", str(config)]
            self.single = EmbeddedServer(self.root / "r1", extra_args=extra).start()
            return [self.single.url]
        self.cluster = Cluster(self.root / "r3", self.setup.replicas,
                               sync_interval=self.setup.sync_interval).start()
        return self.cluster.urls

    def stop(self) -> None:
        if self.single is not None:
            self.single.stop()
        if self.cluster is not None:
            self.cluster.stop()

    def leader_url(self, leader_name: str | None) -> str:
        if self.cluster is not None:
            return self.cluster.urls[self.cluster.index_of(leader_name)] if leader_name else self.cluster.urls[0]
        assert self.single is not None
        return self.single.url


async def sync_publish(js, prefix: str, count: int, budget_s: float) -> float:
    started = time.perf_counter()
    deadline = started + budget_s
    sent = 0
    while sent < count and time.perf_counter() < deadline:
        await js.publish(f"bench.{prefix}.{sent}", PAYLOAD)
        sent += 1
    return sent / (time.perf_counter() - started)


async def pipelined_publish(js, prefix: str, count: int, budget_s: float) -> float:
    started = time.perf_counter()
    deadline = started + budget_s
    sent = 0
    while sent < count and time.perf_counter() < deadline:
        # No wait_stall: it wraps every publish in asyncio.wait_for (a task each), ~3x slower here,
        # and a 512 window never reaches nats-py's 4000 pending limit anyway.
        window = [await js.publish_async(f"bench.{prefix}.{sent + i}", PAYLOAD)
                  for i in range(min(WINDOW, count - sent))]
        await asyncio.gather(*window)
        sent += len(window)
    return sent / (time.perf_counter() - started)


async def measure(servers: Servers, urls: list[str], opts: argparse.Namespace) -> dict[str, float]:
    admin = await bus.connect(urls[0], name="bench-durability-admin")
    try:
        ajs = admin.jetstream()
        await ajs.add_stream(StreamConfig(name=STREAM, subjects=["bench.>"], storage=StorageType.FILE,
                                          num_replicas=servers.setup.replicas))
        info = await ajs.stream_info(STREAM)
        leader = info.cluster.leader if info.cluster is not None else None
    finally:
        await admin.close()
    nc = await bus.connect(servers.leader_url(leader), name="bench-durability")
    try:
        js = nc.jetstream()
        await sync_publish(js, "warm", 200, 2.0)
        return {"sync": await sync_publish(js, "s", opts.sync_msgs, opts.budget),
                "pipelined": await pipelined_publish(js, "p", opts.pipelined_msgs, opts.budget * 1.5)}
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sync-msgs", type=int, default=3000, help="At most this many sync publishes a round.")
    parser.add_argument("--pipelined-msgs", type=int, default=15000,
                        help="At most this many pipelined publishes a round.")
    parser.add_argument("--rounds", type=int, default=3, help="Rounds per setup (the median is reported).")
    parser.add_argument("--budget", type=float, default=2.5,
                        help="Seconds a sync round may take (pipelined: 1.5x).")
    opts = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="dtf-durability-"))
    rounds: dict[str, dict[str, list[float]]] = {s.label: {"sync": [], "pipelined": []} for s in SETUPS}
    started = time.monotonic()
    try:
        # Rounds outside, setups inside, each on fresh servers: drift in the machine's load spreads
        # over every setup instead of landing on one.
        for r in range(opts.rounds):
            for n, setup in enumerate(SETUPS):
                servers = Servers(setup, scratch / f"round{r}-setup{n}")
                try:
                    urls = servers.start()
                    rates = asyncio.run(measure(servers, urls, opts))
                finally:
                    servers.stop()
                for kind, value in rates.items():
                    rounds[setup.label][kind].append(value)
                print(f"round {r + 1} {setup.label:<30} sync {rates['sync']:>7,.0f}/s  "
                      f"pipelined {rates['pipelined']:>7,.0f}/s", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    results = {label: {kind: statistics.median(values) for kind, values in kinds.items()}
               for label, kinds in rounds.items()}
    print(f"\nmedian of {opts.rounds} rounds, 600-byte messages, msg/s:")
    for label, kinds in results.items():
        print(f"  {label:<30} sync {kinds['sync']:>7,.0f}   pipelined {kinds['pipelined']:>7,.0f}")

    def ratio(a: Setup, b: Setup, kind: str) -> float:
        return results[a.label][kind] / results[b.label][kind]

    r1d, r1a, r3d, r3a = SETUPS
    print()
    for kind in ("sync", "pipelined"):
        print(f"{kind:>9}: R1 always/default {ratio(r1a, r1d, kind):.2f}   R3 always/default "
              f"{ratio(r3a, r3d, kind):.2f}   R3/R1 default {ratio(r3d, r1d, kind):.2f}   "
              f"R3 always / R1 default {ratio(r3a, r1d, kind):.2f}")
    print(f"(took {time.monotonic() - started:.0f}s)")
    print(json.dumps({label: {k: round(v) for k, v in kinds.items()} for label, kinds in results.items()}))


if __name__ == "__main__":
    main()
