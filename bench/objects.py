"""Reading objects: dtf's consumer-free reads (dtf.streams.objects) against nats-py's ObjectStore.get.

    python bench/objects.py [--sizes 4096,131072,1048576,16777216] [--rounds 5]

Starts one nats-server (from the wheel, a scratch store, a free 127.0.0.1 port), puts one object of
each size into a bucket made as dtf makes owners' buckets, then reads each back with both, taking
turns, `--rounds` times. Prints the median wall time of each and the ratio (dtf / nats-py); no
thresholds. What the consumer-free read costs: one request per 128 KiB chunk instead of one push
consumer, and no consumer to create.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dtf.streams import bus, objects, topology  # noqa: E402
from dtf.streams.server import EmbeddedServer  # noqa: E402


async def bench(url: str, sizes: list[int], rounds: int) -> None:
    nc = await bus.connect(url, name="bench-objects")
    js = nc.jetstream()
    bucket = topology.artifacts_bucket("bench")
    store = await js.create_object_store(bucket, topology.owner_bucket(bucket))
    print(f"{'size':>10} {'dtf ms':>9} {'nats-py ms':>11} {'ratio':>6}")
    for size in sizes:
        payload = bytes(i % 251 for i in range(size))
        await store.put(f"o{size}", payload)
        ours, theirs = [], []
        for _ in range(rounds):
            start = time.perf_counter()
            assert await objects.get(js, bucket, f"o{size}") == payload
            ours.append(time.perf_counter() - start)
            start = time.perf_counter()
            assert (await store.get(f"o{size}")).data == payload
            theirs.append(time.perf_counter() - start)
        a, b = statistics.median(ours) * 1000, statistics.median(theirs) * 1000
        print(f"{size:>10} {a:>9.2f} {b:>11.2f} {a / b:>6.2f}")
    await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="4096,131072,1048576,16777216")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    with tempfile.TemporaryDirectory(prefix="dtf-objects-") as tmp, EmbeddedServer(Path(tmp) / "nats") as server:
        asyncio.run(bench(server.url, sizes, args.rounds))


if __name__ == "__main__":
    main()
