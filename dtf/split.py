"""Splitting a collected pytest suite into shards by each test's recorded duration: pure functions.

    estimates   each node id's duration: its history (median of recent passed runs, matched to the
                collected id even when pytest reported it relative to another rootdir); an unknown
                test gets the median of the known tests in its file, else of the whole suite, else
                `PRIOR_S`; `plan` adds `TEST_OVERHEAD_S` to each
    units       what must stay together (`--group`): a test, a class, a file; `auto` keeps files
                whole unless one is so big that keeping it whole would hurt the balance, and then
                splits it by class, then by test
    pack        longest-processing-time first into `slots` core shards that cover `CORE_FRACTION`
                of the estimated time, then tail shards of decreasing size (factoring: each round cuts
                half of what is left into `slots` chunks), down to `min_shard_s`

Why decreasing sizes rather than `slots` equal LPT bins: estimates are wrong (a first run has none,
a slow CI box is slower, a test regresses), and a plan of exactly one shard per worker cannot move
work once it is assigned. The coordinator hands out tasks in submission order to whichever capable
worker has a free slot, so a queue of ever smaller shards *is* work stealing: a worker whose core
shard ran long simply takes fewer tail shards, and the last shard anyone starts is small. With
exact estimates the simulated pull schedule is within (1 + (1-CORE_FRACTION)/2) of the lower bound
plus one unit and `min_shard_s` (`tests/test_split.py` checks it with 4/3). Smaller shards cost a
dispatch and, on a worker without a warm pytest process, an interpreter start and a collection each;
`min_shard_s` bounds that overhead.
"""

from __future__ import annotations

import heapq
import re
import statistics
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

Group = Literal["auto", "test", "class", "file"]
GROUPS: tuple[str, ...] = ("auto", "test", "class", "file")

PRIOR_S = 0.1
"""The estimate for a test when nothing at all is known (pytest suites are mostly short tests)."""
TEST_OVERHEAD_S = 0.002
"""Added to every test's estimate: what a test costs beyond its recorded duration (pytest's run
protocol and reports, and its share of importing its module). Measured on networkx's 6,890 tests
here: 2-2.5 ms a test; without it a tail shard of 1,300 one-millisecond tests looks like 1 s and
takes 4."""
CORE_FRACTION = 0.7
MIN_SHARD_S = 1.0

_PARAMS = re.compile(r"\[.*\]\Z", re.DOTALL)


@dataclass(frozen=True)
class Unit:
    """Tests that run in one shard, in collection order."""

    key: str
    nodeids: tuple[str, ...]
    estimate_s: float


@dataclass(frozen=True)
class Shard:
    nodeids: tuple[str, ...]
    estimate_s: float


def file_of(nodeid: str) -> str:
    return nodeid.partition("::")[0]


def class_of(nodeid: str) -> str:
    """`file::Class` for a test in a class (nested classes included), else the file."""
    parts = _PARAMS.sub("", nodeid).split("::")
    return "::".join(parts[:-1]) if len(parts) > 2 else parts[0]


def _suffixes(path: str) -> Iterator[str]:
    """`a/b/c.py`, `b/c.py`, `c.py`: the path as recorded relative to ever deeper rootdirs."""
    parts = path.split("/")
    return ("/".join(parts[start:]) for start in range(len(parts)))


def match_history(nodeids: Iterable[str], history: Mapping[str, float]) -> dict[str, float]:
    """The recorded duration of each collected node id that has one. The collected ids are relative to
    the shipped root; pytest reports them relative to its rootdir, which may be a folder below it
    (no ini file: the common ancestor of the arguments), so `tests/a/test_x.py::t` also matches a
    recorded `a/test_x.py::t` or `test_x.py::t`, the longest match first."""
    found: dict[str, float] = {}
    for nodeid in nodeids:
        file, sep, rest = nodeid.partition("::")
        for suffix in _suffixes(file):
            candidate = suffix + sep + rest
            if candidate in history:
                found[nodeid] = history[candidate]
                break
    return found


def estimates(nodeids: Sequence[str], known: Mapping[str, float],
              prior_s: float = PRIOR_S) -> dict[str, float]:
    """Every node id's expected duration: its own when known, else the median of the known tests in
    its file, else of the suite, else `prior_s`."""
    per_file: dict[str, list[float]] = {}
    for nodeid in nodeids:
        if nodeid in known:
            per_file.setdefault(file_of(nodeid), []).append(known[nodeid])
    all_known = [known[n] for n in nodeids if n in known]
    suite = statistics.median(all_known) if all_known else prior_s
    file_median = {file: statistics.median(values) for file, values in per_file.items()}
    return {n: known[n] if n in known else file_median.get(file_of(n), suite) for n in nodeids}


def _grouped(nodeids: Sequence[str], durations: Mapping[str, float], key) -> list[Unit]:
    members: dict[str, list[str]] = {}
    for nodeid in nodeids:
        members.setdefault(key(nodeid), []).append(nodeid)
    return [Unit(k, tuple(ids), sum(durations[n] for n in ids)) for k, ids in members.items()]


def units(nodeids: Sequence[str], durations: Mapping[str, float], group: Group, slots: int) -> list[Unit]:
    """The suite cut into what must stay together, each in collection order. `auto`: whole files,
    except that a file longer than half a worker's fair share (total / slots / 2) is cut by class,
    and such a class by test: a module fixture set up twice costs less than a worker left waiting."""
    if group == "test":
        return _grouped(nodeids, durations, lambda n: n)
    if group == "class":
        return _grouped(nodeids, durations, class_of)
    files = _grouped(nodeids, durations, file_of)
    if group == "file":
        return files
    limit = sum(durations[n] for n in nodeids) / max(slots, 1) / 2
    result: list[Unit] = []
    for unit in files:
        if unit.estimate_s <= limit:
            result.append(unit)
            continue
        for part in _grouped(unit.nodeids, durations, class_of):
            by_test = part.estimate_s > limit
            result.extend(_grouped(part.nodeids, durations, lambda n: n) if by_test else [part])
    return result


def _longest_first(items: list[Unit]) -> list[Unit]:
    return sorted(items, key=lambda u: (-u.estimate_s, u.key))


def pack(items: Sequence[Unit], slots: int, *, min_shard_s: float = MIN_SHARD_S,
         core_fraction: float = CORE_FRACTION, order: Mapping[str, int] | None = None) -> list[Shard]:
    """Shards in the order to submit them: `slots` core shards packed longest-first (LPT: each unit,
    longest first, to the least loaded shard) until each holds `core_fraction` of a fair share, then
    tail shards whose target size halves each round (remaining / (2 * slots)), never below
    `min_shard_s`. Node ids inside a shard follow `order` (collection order), so tests of a module
    run together and its fixtures are set up once. Deterministic: ties go by unit key."""
    if slots < 1:
        raise ValueError("slots must be at least 1")
    ranked = _longest_first(list(items))
    total = sum(u.estimate_s for u in ranked)
    if slots == 1 or not ranked:
        return [_shard(ranked, order)] if ranked else []
    target = core_fraction * total / slots
    core: list[list[Unit]] = [[] for _ in range(slots)]
    loads = [(0.0, 0, i) for i in range(slots)]  # a heap of (load, units, shard index)
    rest: list[Unit] = []
    for unit in ranked:
        load, count, index = loads[0]
        if load >= target and count:  # every core shard is full: this and all shorter units go to the tail
            rest.append(unit)
            continue
        core[index].append(unit)
        heapq.heapreplace(loads, (load + unit.estimate_s, count + 1, index))
    shards = sorted((_shard(members, order) for members in core if members),
                    key=lambda s: (-s.estimate_s, s.nodeids))
    return shards + _tail(rest, slots, min_shard_s, order)


def _tail(rest: list[Unit], slots: int, min_shard_s: float, order: Mapping[str, int] | None) -> list[Shard]:
    shards: list[Shard] = []
    remaining = sum(u.estimate_s for u in rest)
    position = 0
    while position < len(rest):
        size = max(remaining / (2 * slots), min_shard_s)
        for _ in range(slots):
            if position >= len(rest):
                break
            chunk: list[Unit] = []
            load = 0.0
            while position < len(rest) and (not chunk or load + rest[position].estimate_s <= size):
                chunk.append(rest[position])
                load += rest[position].estimate_s
                position += 1
            shards.append(_shard(chunk, order))
            remaining -= load
    return shards


def _shard(members: Sequence[Unit], order: Mapping[str, int] | None) -> Shard:
    nodeids = [n for unit in members for n in unit.nodeids]
    if order is not None:
        nodeids.sort(key=lambda n: order[n])
    return Shard(tuple(nodeids), sum(u.estimate_s for u in members))


def plan(nodeids: Sequence[str], history: Mapping[str, float], slots: int, *, group: Group = "auto",
         min_shard_s: float = MIN_SHARD_S, prior_s: float = PRIOR_S,
         overhead_s: float = TEST_OVERHEAD_S) -> list[Shard]:
    """The shards for a collected suite (`nodeids` in collection order, duplicates ignored); each
    test is estimated at its expected duration plus `overhead_s`."""
    collected = list(dict.fromkeys(nodeids))
    expected = estimates(collected, match_history(collected, history), prior_s)
    durations = {n: d + overhead_s for n, d in expected.items()}
    order = {n: i for i, n in enumerate(collected)}
    return pack(units(collected, durations, group, slots), slots, min_shard_s=min_shard_s, order=order)


def plan_files(files: Sequence[str], history: Mapping[str, float], slots: int, *, group: Group = "auto",
               min_shard_s: float = MIN_SHARD_S, overhead_s: float = TEST_OVERHEAD_S) -> list[Shard] | None:
    """Shards of whole files (`files` in collection order), each estimated from the tests it recorded,
    for a suite that was not collected. A file with no recorded passing test (new, or all skipped
    here) gets the median of the others. None when that would plan worse than collecting: when
    fewer than half the files have recorded tests, or, under `auto`, when a file is so long that it
    should be cut by class or test (as `units` would)."""
    if group not in ("auto", "file") or not files:
        return None
    recorded: dict[str, list[float]] = {}
    for nodeid, seconds in history.items():
        recorded.setdefault(file_of(nodeid), []).append(seconds)
    ordered = list(dict.fromkeys(files))
    known: dict[str, float] = {}
    for file in ordered:
        found = next((recorded[s] for s in _suffixes(file) if s in recorded), None)  # as `match_history`
        if found:
            known[file] = sum(found) + overhead_s * len(found)
    if 2 * len(known) < len(ordered):
        return None
    guess = statistics.median(known.values())
    estimate = {file: known.get(file, guess) for file in ordered}
    if group == "auto" and max(estimate.values()) > sum(estimate.values()) / max(slots, 1) / 2:
        return None
    items = [Unit(file, (file,), seconds) for file, seconds in estimate.items()]
    return pack(items, slots, min_shard_s=min_shard_s, order={file: i for i, file in enumerate(ordered)})


def pull_makespan(shard_durations: Sequence[float], slots: int) -> float:
    """When the last of the shards ends if `slots` workers each take the next one in order as soon as
    they are free (what the coordinator does with a queue of equal-priority tasks)."""
    free = [0.0] * slots
    for duration in shard_durations:
        heapq.heapreplace(free, free[0] + duration)
    return max(free)


def lower_bound(durations: Sequence[float], slots: int) -> float:
    """No schedule of these units on `slots` workers ends sooner."""
    return max(sum(durations) / slots, max(durations, default=0.0))
