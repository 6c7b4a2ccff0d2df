"""Fuzzing what dtf accepts from outside: hypothesis-generated inputs against each decoder, and counts.

    events     dtf.events.decode(bytes) -> an event, or DecodeError with a reason; nothing else
    fold       dtf.state.Fold.apply(subject, seq, bytes): never raises; a refused message says why
               (a consumer's whole input path: subject, decode, admission, state machines), and
               no decision the scheduler then makes outgrows one NATS message
    replay     dtf.replay.Cutoff (`dtf replay --until`, rebuilds): reads any message's time or none
    hostile    the fold on a submission subject, hostile inputs only: each refused, with its reason
    spec       dtf.spec.spec_from_json(bytes) -> a validated TaskSpec, or SpecError with a reason
    spec_file  the CLI's `--spec FILE` loader -> specs, or a one-line CliError (exit 2)

Inputs mix random bytes, arbitrary JSON, valid events and specs with fields replaced, dropped or
added, truncated or bit-flipped encodings, deeply nested documents, and hostile ones: submissions
around the size limit up to 1,048,470 bytes (just under NATS' max_payload with dtf's headers), events
nesting past the depth limit up to 20,000 levels, 100 KB of nesting (balanced or unclosed) inside an
event object, up to 100 KB of unclosed brackets, and times without an offset or outside UTC, in the
event's time, a spec's deadline, or both. An accepted input must
round-trip (encode, decode, equal). Each call is timed: a call over HANG_S twice counts as a hang.

    .venv/bin/python bench/fuzz.py [--examples 10000] [--seed N]

prints, per target, how many inputs ran, were accepted, were rejected (by reason class), crashed or
hung, and the slowest call. tests/test_fuzz.py runs the same checks with fewer examples.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dtf import events as ev
from dtf import schedule, subjects
from dtf.cli.common import CliError
from dtf.limits import MAX_DEPTH, MAX_SUBMISSION_BYTES, NATS_MAX_PAYLOAD
from dtf.replay import Cutoff, event_time
from dtf.spec import RetryPolicy, SpecError, TaskSpec, spec_from_json, validate
from dtf.state import Fold
from dtf.streams import bus

HANG_S = 1.0

# --- inputs -------------------------------------------------------------------------------------------

SPECS = [
    TaskSpec(type="test", config={"paths": ["tests/test_a.py"], "pytest_args": ["-x"]}, priority=1,
             dependencies=["run-1-2"], labels={"suite": "unit"}, retry_policy=RetryPolicy(max_retries=2),
             deadline=datetime(2030, 1, 1, tzinfo=UTC)),
    TaskSpec(type="command", config={"command": "make check"}),
    TaskSpec(type="benchmark", config={"command": "python bench.py", "model": "bert", "batch_sizes": [1, 8]}),
]
EVENTS: list[ev.Event] = [
    ev.TaskSubmitted(id="s1", run_id="run-1", task_id="run-1-1", submitter="alice", spec=SPECS[0]),
    ev.TaskAssigned(id="a1", run_id="run-1", task_id="run-1-1", attempt=1, worker_id="w1", coordinator="c",
                    spec=SPECS[1]),
    ev.TaskStarted(id="t1", run_id="run-1", task_id="run-1-1", attempt=1, worker_id="w1", pid=12),
    ev.ResultReported(id="r1", run_id="run-1", task_id="run-1-1", attempt=1, worker_id="w1", outcome="failed",
                      tests=[ev.TestOutcome(nodeid="t.py::a", outcome="failed", message="boom")]),
    ev.TaskFailed(id="f1", run_id="run-1", task_id="run-1-1", attempt=1, worker_id="w1", category="network",
                  reason="gone"),
    ev.TaskCancelled(id="c1", run_id="run-1", task_id="run-1-1", reason="no", by="alice"),
    ev.WorkerRegistered(worker_id="w1", host="h", pid=1),
    ev.WorkerHeartbeat(worker_id="w1", running=["run-1-1"]),
]
EVENT_DICTS = [msgspec.json.decode(ev.encode(e)) for e in EVENTS]
SPEC_DICTS = [msgspec.json.decode(msgspec.json.encode(s)) for s in SPECS]

scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


@st.composite
def mutated(draw: st.DrawFn, originals: list[dict]) -> Any:
    """A valid document with a few fields replaced, dropped or added, at any depth."""
    doc = json.loads(json.dumps(draw(st.sampled_from(originals))))
    for _ in range(draw(st.integers(1, 3))):
        target = doc
        while isinstance(target, dict) and target and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(target)))
            if not isinstance(target[key], dict):
                break
            target = target[key]
        if not isinstance(target, dict):
            break
        action = draw(st.sampled_from(["replace", "drop", "add"]))
        keys = sorted(target)
        if action == "replace" and keys:
            target[draw(st.sampled_from(keys))] = draw(json_values)
        elif action == "drop" and keys:
            del target[draw(st.sampled_from(keys))]
        else:
            target[draw(st.text(max_size=12))] = draw(json_values)
    return doc


def _dumps(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


@st.composite
def damaged(draw: st.DrawFn, originals: list[bytes]) -> bytes:
    """A valid encoding cut short or with some bytes overwritten."""
    data = bytearray(draw(st.sampled_from(originals)))
    if draw(st.booleans()):
        return bytes(data[: draw(st.integers(0, len(data)))])
    for _ in range(draw(st.integers(1, 4))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data)


deep = st.builds(lambda n, open_, close: (open_ * n + close * n).encode(), st.integers(1, 20_000),
                 st.sampled_from(["[", '{"a":']), st.sampled_from(["]", "}"]))


def documents(originals: list[dict]) -> st.SearchStrategy[bytes]:
    encoded = [_dumps(o) for o in originals]
    return st.one_of(
        st.binary(max_size=300), json_values.map(_dumps), mutated(originals).map(_dumps),
        mutated(originals).map(_dumps), damaged(encoded), deep,
    )


def _submission(**config: Any) -> dict:
    doc = json.loads(json.dumps(EVENT_DICTS[0]))
    doc["spec"]["config"].update(config)
    return doc


def oversize(size: int) -> bytes:
    """A well-formed submission of about `size` bytes."""
    return _dumps(_submission(blob="x" * max(0, size - len(_dumps(_submission())))))


def nested_in_event(levels: int, closed: bool = True) -> bytes:
    return _dumps(_submission()).replace(b'"pytest_args"', b'"deep": ' + b"[" * levels
                                         + (b"]" * levels if closed else b"") + b', "pytest_args"')


ATTACK_BYTES = 1_048_470
"""The size of issue #13's oversize attack: the biggest submission the server still takes in one message."""


BAD_TIMES = ["2026-01-01T00:00:00", "2026-01-01 00:00:00", "9999-12-31T23:59:59-23:59",
             "0001-01-01T00:00:00+23:59", "2026-01-01T00:00:00+25:00"]


@st.composite
def offsetless(draw: st.DrawFn) -> bytes:
    """A valid event whose time (or deadline) has no offset, or one outside UTC's range."""
    doc = json.loads(json.dumps(draw(st.sampled_from(EVENT_DICTS))))
    bad = draw(st.sampled_from(BAD_TIMES))
    where = draw(st.sampled_from(["time", "deadline", "both"])) if "deadline" in doc.get("spec", {}) else "time"
    if where != "time":
        doc["spec"]["deadline"] = bad
    if where != "deadline":
        doc["time"] = bad
    return _dumps(doc)


hostile = st.one_of(
    st.integers(MAX_SUBMISSION_BYTES - 2000, ATTACK_BYTES).map(oversize),
    st.just(ATTACK_BYTES).map(oversize),
    st.integers(MAX_DEPTH - 8, 20_000).map(nested_in_event),
    st.builds(nested_in_event, st.integers(50_000, 100_000), st.booleans()),
    st.integers(1, 100_000).map(lambda n: b"[" * n),
    offsetless(),
)
event_inputs = st.one_of(documents(EVENT_DICTS), hostile)
spec_inputs = documents(SPEC_DICTS)
fold_inputs = st.tuples(
    st.one_of(st.sampled_from([subjects.subject_for(e) for e in EVENTS]), st.text(max_size=60),
              st.sampled_from(["dtf.task.run-1.run-1-1.result.w2", "dtf.task.a.b.c", "dtf.hb.", "dtf.worker.w1"])),
    event_inputs,
)

# --- the properties -----------------------------------------------------------------------------------


def reason_class(message: str) -> str:
    """The first words of a rejection (numbers as N), to count rejections by kind."""
    return " ".join(re.sub(r"\d+", "N", message).replace(":", " ").split()[:3]) or "(empty reason)"


def check_event(data: bytes) -> str:
    try:
        event = ev.decode(data)
    except ev.DecodeError as exc:
        assert str(exc), "a rejection without a reason"
        return reason_class(str(exc))
    assert ev.decode(ev.encode(event)) == event, "an accepted event does not round-trip"
    return "accepted"


def check_fold(subject_and_data: tuple[str, bytes]) -> str:
    subject, data = subject_and_data
    fold = Fold()
    for seq, event in enumerate(EVENTS[:2], 1):  # a task that exists and is assigned
        fold.apply(subjects.subject_for(event), seq, ev.encode(event))
    applied = fold.apply(subject, 3, data)
    now = datetime(2026, 1, 1, tzinfo=UTC)
    for decision in schedule.decide(fold, now, "c" * 80):
        size = bus.message_size(ev.encode(decision), bus.headers_for(decision, expected_seq=1 << 62))
        assert size <= NATS_MAX_PAYLOAD, f"a {type(decision).__name__} of {size} bytes"
    if applied.event is None:
        assert applied.invalid_reason, "a refused message without a reason"
        return reason_class(applied.invalid_reason)
    return "accepted"


def check_replay(data: bytes) -> str:
    cutoff = Cutoff(until=datetime(2026, 1, 1, tzinfo=UTC))
    cutoff.ends_before(1, data)
    cutoff.heartbeat_counts(data)
    return "accepted" if event_time(data) is not None else "no event time"


def check_spec(data: bytes) -> str:
    try:
        spec = spec_from_json(data)
    except SpecError as exc:
        assert str(exc), "a rejection without a reason"
        return reason_class(str(exc))
    assert validate(spec) == spec_from_json(msgspec.json.encode(spec)), "an accepted spec does not round-trip"
    return "accepted"


class SpecFile:
    """`dtf submit --spec FILE`'s loader on a file holding the input."""

    def __init__(self) -> None:
        self.path = Path(tempfile.mkdtemp(prefix="dtf-fuzz-")) / "spec.json"

    def __call__(self, data: bytes) -> str:
        from dtf.cli.commands_submit import load_spec_file

        self.path.write_bytes(data)
        try:
            specs = load_spec_file(self.path)
        except CliError as exc:
            message = exc.format_message()
            assert message and "\n" not in message.strip(), "a rejection that is not one line"
            return reason_class(message.replace(str(self.path), "FILE"))
        assert specs and all(isinstance(s, TaskSpec) for s in specs)
        return "accepted"


TARGETS: dict[str, tuple[st.SearchStrategy, Callable[[Any], str]]] = {
    "events": (event_inputs, check_event),
    "fold": (fold_inputs, check_fold),
    "replay": (event_inputs, check_replay),
    "hostile": (hostile, lambda data: check_fold(("dtf.task.run-1.run-1-1.submitted.alice", data))),
    "spec": (spec_inputs, check_spec),
    "spec_file": (spec_inputs, SpecFile()),
}

# --- the bench ----------------------------------------------------------------------------------------


def run(name: str, examples: int, random_seed: int) -> dict:
    strategy, check = TARGETS[name]
    outcomes: Counter[str] = Counter()
    crashes: list[str] = []
    slowest = 0.0

    @seed(random_seed)
    @settings(max_examples=examples, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(value: Any) -> None:
        nonlocal slowest
        started = time.perf_counter()
        try:
            outcomes[check(value)] += 1
        except Exception as exc:  # noqa: BLE001 - a crash is what we count
            outcomes["CRASH"] += 1
            if len(crashes) < 5:
                crashes.append(f"{type(exc).__name__}: {exc} <- {value!r:.200}")
        elapsed = time.perf_counter() - started
        if elapsed > HANG_S:  # timed again: on a shared machine a pause is not yet a hang
            started = time.perf_counter()
            with contextlib.suppress(Exception):
                check(value)
            elapsed = min(elapsed, time.perf_counter() - started)
            if elapsed > HANG_S:
                outcomes["HANG"] += 1
                crashes.append(f"HANG {elapsed:.1f}s <- {value!r:.200}")
        slowest = max(slowest, elapsed)

    one()
    total = sum(v for k, v in outcomes.items() if k != "HANG")
    return {"target": name, "inputs": total, "accepted": outcomes["accepted"],
            "rejected": total - outcomes["accepted"] - outcomes["CRASH"], "crashes": outcomes["CRASH"],
            "hangs": outcomes["HANG"], "slowest_ms": round(slowest * 1000, 1),
            "top_reasons": [r for r in outcomes.most_common() if r[0] not in ("accepted", "CRASH", "HANG")][:6],
            "crash_examples": crashes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10_000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--target", choices=sorted(TARGETS), action="append")
    opts = parser.parse_args()
    failed = False
    for name in opts.target or list(TARGETS):
        report = run(name, opts.examples, opts.seed)
        failed |= bool(report["crashes"] or report["hangs"])
        print(json.dumps(report))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
