"""The event contract: every event type survives the wire, `decode` turns any bytes into an event or a
DecodeError (never another exception), and old versions are upcast while future ones are refused."""

from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta, timezone
from typing import get_args

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf import events as ev
from dtf import spec as sp
from dtf import subjects

SOME = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --- strategies ---------------------------------------------------------------------------------------
# JSON carries no NaN or Infinity (msgspec writes them as null, which no float field accepts), and
# msgspec's integers are 64-bit: the strategies stay inside what the wire can say.

tokens = st.from_regex(r"[A-Za-z0-9_-]{1,16}", fullmatch=True)
texts = st.text(max_size=20)
floats = st.floats(allow_nan=False, allow_infinity=False)
non_negative = st.floats(min_value=0, max_value=1e9, allow_nan=False)
ints = st.integers(-(2**63), 2**63 - 1)
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))
times = st.datetimes(
    min_value=datetime(1970, 1, 2), max_value=datetime(9998, 12, 31),
    timezones=st.just(UTC) | offsets,
)
json_scalars = st.none() | st.booleans() | ints | floats | texts
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(texts, inner, max_size=3),
    max_leaves=10,
)

requirements = st.builds(
    sp.Requirements,
    hardware=st.lists(st.sampled_from(sp.HARDWARE_KINDS), max_size=3),
    min_memory_gb=st.none() | non_negative,
    min_cuda_compute=st.none() | st.floats(0, 10),
    gpu_count=st.integers(0, 8),
    browser=st.none() | texts,
    device_type=st.none() | texts,
    tags=st.dictionaries(texts, texts, max_size=2),
)
retry_policies = st.builds(
    sp.RetryPolicy, max_retries=st.integers(0, 100), retry_delay_seconds=non_negative,
    max_delay_seconds=non_negative, jitter=st.booleans(),
)
specs = st.builds(
    sp.TaskSpec,
    type=st.sampled_from(sp.TASK_TYPES),
    name=texts,
    config=st.dictionaries(texts, json_values, max_size=3),
    requirements=requirements,
    priority=ints,
    timeout_seconds=st.floats(min_value=0.001, max_value=1e9),
    retry_policy=retry_policies,
    dependencies=st.lists(tokens, max_size=3),
    labels=st.dictionaries(texts, texts, max_size=2),
    deadline=st.none() | times,
    workspace=st.none() | st.builds(
        sp.WorkspaceRef, sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True),
        size=st.integers(0, 2**40), files=st.integers(0, 10**6),
    ),
)
counts = st.builds(ev.TestCounts, passed=st.integers(0, 10**6), failed=st.integers(0, 10**6),
                   skipped=st.integers(0, 10**6), errors=st.integers(0, 10**6))
test_outcomes = st.builds(ev.TestOutcome, nodeid=texts, outcome=st.sampled_from(get_args(ev.TestStatus)),
                          duration_s=non_negative, message=texts)
capabilities = st.builds(
    ev.Capabilities,
    hardware=st.lists(st.sampled_from(sp.HARDWARE_KINDS), max_size=3),
    cores=st.integers(0, 512), memory_gb=non_negative, platform=texts, python=texts,
    gpus=st.lists(st.builds(ev.Gpu, name=texts, memory_gb=non_negative,
                            cuda_compute=st.none() | st.floats(0, 10)), max_size=2),
    tags=st.dictionaries(texts, texts, max_size=2),
)

envelope = {"id": texts, "time": times}
task = dict(envelope, run_id=tokens, task_id=tokens)
attempt = dict(task, attempt=st.integers(1, 100), worker_id=tokens)

detection = dict(
    series=texts, benchmark=texts, metric=texts, labels=st.dictionaries(texts, texts, max_size=3),
    hardware=st.lists(texts, max_size=2), better=st.sampled_from(["lower", "higher"]), size=floats,
    confidence=st.floats(0, 1), detector=texts, result_ids=st.lists(texts, max_size=3),
)
STRATEGIES: dict[type[ev.Event], st.SearchStrategy[ev.Event]] = {
    ev.TaskSubmitted: st.builds(ev.TaskSubmitted, **task, submitter=tokens, project=texts, spec=specs),
    ev.TaskAssigned: st.builds(ev.TaskAssigned, **attempt, coordinator=tokens, spec=specs),
    ev.TaskStarted: st.builds(ev.TaskStarted, **attempt, pid=st.none() | st.integers(0, 2**31)),
    ev.ResultReported: st.builds(
        ev.ResultReported, **attempt, outcome=st.sampled_from(get_args(ev.Outcome)),
        exit_code=st.none() | st.integers(-255, 255), duration_s=non_negative, counts=counts,
        tests=st.lists(test_outcomes, max_size=3), tests_ref=st.none() | texts,
        metrics=st.dictionaries(texts, floats, max_size=3), labels=st.dictionaries(texts, texts, max_size=2),
        output_tail=texts, log_ref=st.none() | texts,
    ),
    ev.TaskFailed: st.builds(ev.TaskFailed, **attempt, category=st.sampled_from(get_args(ev.ErrorCategory)),
                             reason=texts),
    ev.TaskReleased: st.builds(ev.TaskReleased, **attempt, reason=texts),
    ev.TaskPreempted: st.builds(ev.TaskPreempted, **attempt, by_task=tokens, reason=texts),
    ev.TaskCancelled: st.builds(ev.TaskCancelled, **task, reason=texts, by=st.just("") | tokens),
    ev.TaskRejected: st.builds(ev.TaskRejected, **task, reason=texts, raw=texts, source_subject=texts,
                               source_seq=st.integers(0, 2**63 - 1)),
    ev.TaskUnschedulable: st.builds(ev.TaskUnschedulable, **task, reason=texts),
    ev.TaskDeadlineMissed: st.builds(ev.TaskDeadlineMissed, **task, deadline=times,
                                     status=st.sampled_from(["pending", "unschedulable", "assigned", "running"])),
    ev.WorkerRegistered: st.builds(ev.WorkerRegistered, **envelope, worker_id=tokens, host=texts,
                                   pid=st.integers(0, 2**31), concurrency=st.integers(0, 64),
                                   capabilities=capabilities),
    ev.WorkerHeartbeat: st.builds(ev.WorkerHeartbeat, **envelope, worker_id=tokens,
                                  running=st.lists(tokens, max_size=3), cpu_percent=st.floats(0, 100),
                                  memory_percent=st.floats(0, 100)),
    ev.WorkerLeft: st.builds(ev.WorkerLeft, **envelope, worker_id=tokens, reason=texts),
    ev.WorkerLost: st.builds(ev.WorkerLost, **envelope, worker_id=tokens, last_seen=st.none() | times,
                             reason=texts),
    ev.WorkerQuarantined: st.builds(ev.WorkerQuarantined, **envelope, worker_id=tokens, until=times,
                                    reason=texts),
    ev.WorkerDrainRequested: st.builds(ev.WorkerDrainRequested, **envelope, worker_id=tokens, by=texts,
                                       reason=texts),
    ev.RegressionDetected: st.builds(ev.RegressionDetected, **task, **detection, before=floats, after=floats,
                                     change_run_id=texts),
    ev.AnomalyDetected: st.builds(ev.AnomalyDetected, **task, **detection, value=floats, expected=floats,
                                  direction=st.sampled_from(["worse", "better"])),
}
any_event = st.one_of(*STRATEGIES.values())


def decode_or_error(data: bytes) -> ev.Event | None:
    """`decode` may only ever return an event or raise DecodeError with a one-line reason."""
    try:
        event = ev.decode(data)
    except ev.DecodeError as exc:
        assert str(exc)
        return None
    assert isinstance(event, tuple(ev.EVENT_TYPES.values()))
    return event


# --- round trips ----------------------------------------------------------------------------------------


def test_every_event_type_has_a_strategy_a_subject_kind_and_a_current_version():
    assert set(STRATEGIES) == set(ev.EVENT_TYPES.values())
    assert set(subjects.TASK_KINDS) | set(subjects.WORKER_KINDS) | {ev.WorkerHeartbeat} == set(STRATEGIES)
    assert ev.CURRENT_VERSION["TaskSubmitted"] == 2
    assert all(v >= 1 for v in ev.CURRENT_VERSION.values())


@pytest.mark.parametrize("cls", list(STRATEGIES), ids=lambda cls: cls.__name__)
@SOME
@given(data=st.data())
def test_every_event_type_survives_an_encode_decode_round_trip(cls, data):
    event = data.draw(STRATEGIES[cls])
    wire = ev.encode(event)
    back = ev.decode(wire)
    assert type(back) is cls and back == event
    assert ev.encode(back) == wire, "encoding is stable: a re-published event is byte-identical"
    assert json.loads(wire)["type"] == cls.__name__ and json.loads(wire)["v"] == ev.CURRENT_VERSION[cls.__name__]


@SOME
@given(any_event)
def test_every_event_lands_on_a_subject_that_names_its_kind_and_ids(event):
    subject = subjects.subject_for(event)
    parsed = subjects.parse(subject)
    assert subjects.KIND_TYPES.get(parsed.kind, ev.WorkerHeartbeat) is type(event)
    assert parsed.party == subjects.party_of(event) if isinstance(event, ev.TaskEvent) else True
    if isinstance(event, ev.TaskEvent):
        assert (parsed.run_id, parsed.task_id) == (event.run_id, event.task_id)
    assert subjects.mismatch(event, subject) is None


@SOME
@given(any_event, st.data())
def test_decoding_the_same_bytes_twice_gives_the_same_event_even_with_fields_left_out(event, data):
    """Replays must agree: nothing may be filled in from the clock or a random generator."""
    obj = msgspec.to_builtins(event)
    for key in data.draw(st.lists(st.sampled_from(sorted(set(obj) - {"type"})), max_size=3)):
        obj.pop(key, None)
    wire = json.dumps(obj).encode()
    assert decode_or_error(wire) == decode_or_error(wire)


@pytest.mark.parametrize("missing", ["id", "time"])
def test_an_event_without_its_id_or_time_is_refused_rather_than_given_fresh_ones(missing):
    """Defaults from the clock or a random generator would make every replay see a different event."""
    wire = json.loads(ev.encode(ev.WorkerLeft(id="left-w1", worker_id="w1")))
    del wire[missing]
    data = json.dumps(wire).encode()
    with pytest.raises(ev.DecodeError, match=missing):
        ev.decode(data)


def test_an_event_time_without_a_utc_offset_is_refused():
    """A naive time cannot be ordered against the aware ones every other event carries."""
    wire = json.loads(ev.encode(ev.WorkerLeft(id="left-w1", worker_id="w1")))
    wire["time"] = "2025-06-01T10:00:00"
    with pytest.raises(ev.DecodeError):
        ev.decode(json.dumps(wire).encode())
    wire["time"] = "2025-06-01T10:00:00+02:00"
    assert ev.decode(json.dumps(wire).encode()).time == datetime(2025, 6, 1, 8, tzinfo=UTC)


# --- decode never raises anything but DecodeError --------------------------------------------------------


@FUZZ
@given(st.binary(max_size=300))
def test_decoding_arbitrary_bytes_gives_an_event_or_a_decode_error(data):
    decode_or_error(data)


@FUZZ
@given(json_values)
def test_decoding_arbitrary_json_values_gives_an_event_or_a_decode_error(value):
    decode_or_error(json.dumps(value).encode())


@FUZZ
@given(st.sampled_from(sorted(ev.EVENT_TYPES)), st.integers(-3, 4) | ints,
       st.dictionaries(st.sampled_from(["id", "time", "run_id", "task_id", "spec", "worker_id", "attempt",
                                        "submitter", "outcome", "capabilities", "reason"]), json_values))
def test_decoding_an_object_with_a_known_type_and_random_fields_gives_an_event_or_a_decode_error(
    type_name, version, fields
):
    decode_or_error(json.dumps({**fields, "type": type_name, "v": version}).encode())


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(4)
        pos = rng.randrange(len(buf) + 1)
        if op == 0 and buf:
            buf[min(pos, len(buf) - 1)] = rng.randrange(256)
        elif op == 1:
            buf[pos:pos] = rng.choice([b"{", b"}", b"[", b'"', b",", b"null", b"1e999", b"\\u", b"\xff"])
        elif op == 2:
            del buf[pos:pos + rng.randint(1, 8)]
        else:
            buf = buf[:pos]
    return bytes(buf)


@FUZZ
@given(any_event, st.randoms(use_true_random=False))
def test_decoding_a_mutated_valid_event_gives_an_event_or_a_decode_error(event, rng):
    decode_or_error(mutate(ev.encode(event), rng))


@FUZZ
@given(any_event, st.data())
def test_decoding_a_valid_event_with_one_field_replaced_gives_an_event_or_a_decode_error(event, data):
    obj = msgspec.to_builtins(event)
    key = data.draw(st.sampled_from(sorted(obj)))
    obj[key] = data.draw(json_values)
    decode_or_error(json.dumps(obj).encode())


@SOME
@given(STRATEGIES[ev.TaskSubmitted], st.data())
def test_decoding_a_submission_with_a_spec_field_replaced_gives_an_event_or_a_decode_error(event, data):
    obj = msgspec.to_builtins(event)
    obj["v"] = data.draw(st.sampled_from([1, 2]))
    target = obj["spec"] if data.draw(st.booleans()) else obj["spec"].setdefault("requirements", {})
    target[data.draw(st.sampled_from(["hardware", "requirements", "type", "config", "min_memory_gb"]))] = \
        data.draw(json_values)
    decode_or_error(json.dumps(obj).encode())


@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("depth", [5_000, 100_000])
def test_decoding_a_deeply_nested_event_is_a_decode_error_not_a_recursion_error(version, depth):
    head = (f'{{"type":"TaskSubmitted","v":{version},"id":"x","time":"2025-01-01T00:00:00Z","run_id":"r",'
            '"task_id":"t","submitter":"a","spec":{"type":"command","config":{"deep":')
    with pytest.raises(ev.DecodeError):
        ev.decode(head.encode() + b"[" * depth + b"]" * depth + b"}}}")


# --- versions -------------------------------------------------------------------------------------------


def v1_submission(hardware) -> dict:
    event = ev.TaskSubmitted(
        id="submit-t1", time=datetime(2025, 6, 1, tzinfo=UTC), run_id="r1", task_id="t1", submitter="alice",
        spec=sp.TaskSpec(type="command", config={"command": "true"}),
    )
    obj = msgspec.to_builtins(event)
    obj["v"] = 1
    if hardware is not None:
        obj["spec"]["requirements"] = {"hardware": hardware, "min_memory_gb": 8}
    return obj


@SOME
@given(st.sampled_from(sp.HARDWARE_KINDS))
def test_a_v1_submission_with_one_hardware_string_is_upcast_to_the_v2_any_of_list(kind):
    event = ev.decode(json.dumps(v1_submission(kind)).encode())
    assert isinstance(event, ev.TaskSubmitted) and event.v == 2
    assert event.spec.requirements.hardware == [kind] and event.spec.requirements.min_memory_gb == 8
    assert ev.decode(ev.encode(event)) == event, "the upcast event is a plain v2 event"


@pytest.mark.parametrize("hardware", [None, [], ["cuda", "rocm"]])
def test_a_v1_submission_without_a_hardware_string_is_upcast_unchanged(hardware):
    event = ev.decode(json.dumps(v1_submission(hardware)).encode())
    assert event.v == 2 and event.spec.requirements.hardware == (hardware or [])


def test_a_v1_submission_without_a_version_field_is_read_as_v1():
    obj = v1_submission("cuda")
    del obj["v"]
    assert ev.decode(json.dumps(obj).encode()).spec.requirements.hardware == ["cuda"]


@SOME
@given(st.sampled_from(sorted(ev.EVENT_TYPES)), st.integers(1, 2**40), any_event)
def test_an_unknown_future_version_is_a_decode_error(type_name, ahead, event):
    obj = msgspec.to_builtins(event)
    obj["type"] = type_name
    obj["v"] = ev.CURRENT_VERSION[type_name] + ahead
    with pytest.raises(ev.DecodeError, match="not supported"):
        ev.decode(json.dumps(obj).encode())


@SOME
@given(any_event, st.integers(-(2**40), 0))
def test_a_version_below_one_is_a_decode_error(event, version):
    obj = msgspec.to_builtins(event)
    obj["v"] = version
    with pytest.raises(ev.DecodeError):
        ev.decode(json.dumps(obj).encode())


def test_every_older_version_of_every_type_has_an_upcaster_to_the_next():
    for name, current in ev.CURRENT_VERSION.items():
        assert all((name, version) in ev.UPCASTERS for version in range(1, current)), name


def test_an_unknown_event_type_is_a_decode_error():
    with pytest.raises(ev.DecodeError, match="unknown event type"):
        ev.decode(b'{"type": "TaskTeleported", "v": 1}')
