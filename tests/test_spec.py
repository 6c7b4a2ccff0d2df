"""Task specs: the one parser (`spec_from_json`) must turn any input into a TaskSpec or a SpecError,
never a crash, and must keep accepting the seeds' spec files."""

from __future__ import annotations

import json
import re

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf import spec as sp
from dtf.limits import MAX_DEPTH

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])

TOKEN = re.compile(r"[A-Za-z0-9_-]{1,80}")

json_scalars = (
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def maybe(key: str, values: st.SearchStrategy) -> st.SearchStrategy:
    """A dict that has `key` with one of `values`, or not."""
    return st.one_of(st.just({}), values.map(lambda v: {key: v}))


def merged(*parts: st.SearchStrategy) -> st.SearchStrategy:
    return st.tuples(*parts).map(lambda ds: {k: v for d in ds for k, v in d.items()})


# Spec-shaped objects: the right keys with plausible and implausible values, so the fuzzing gets past
# the type checks into `validate` and the config accessors.
config_values = merged(
    maybe("paths", json_values | st.lists(st.text(max_size=8), max_size=3) | st.text(max_size=8)),
    maybe("test_file", json_values | st.text(min_size=1, max_size=8)),
    maybe("test_args", json_values | st.lists(st.text(max_size=8), max_size=3)),
    maybe("pytest_args", json_values | st.lists(st.text(max_size=8), max_size=3)),
    maybe("command", json_values | st.text(max_size=8)),
    maybe("model", json_values),
)
requirement_values = merged(
    maybe("hardware", st.lists(st.sampled_from([*sp.HARDWARE_KINDS, "tpu", ""]), max_size=3) | json_values),
    maybe("min_memory_gb", st.floats(-1, 1e6) | json_values),
    maybe("min_cuda_compute", st.floats(-1, 10) | json_values),
    maybe("gpu_count", st.integers(-2, 8) | json_values),
    maybe("browser", st.text(max_size=8) | json_values),
    maybe("tags", st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2) | json_values),
)
spec_shaped = merged(
    st.sampled_from([*sp.TASK_TYPES, *sp.TASK_TYPES, "multi_device_orchestration"]).map(lambda t: {"type": t}),
    st.one_of(config_values, config_values, json_values).map(lambda c: {"config": c}),
    maybe("requirements", requirement_values | json_values),
    maybe("priority", st.integers(-10, 10) | json_values),
    maybe("timeout_seconds", st.floats(-10, 1e6) | json_values),
    maybe("retry_policy", merged(
        maybe("max_retries", st.integers(-1, 120) | json_values),
        maybe("retry_delay_seconds", st.floats(-1, 1e6) | json_values),
    ) | json_values),
    maybe("dependencies", st.lists(st.text(max_size=10), max_size=3) | json_values),
    maybe("labels", st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2) | json_values),
    maybe("surprise", json_values),
)


def parse_or_spec_error(data: bytes | str) -> sp.TaskSpec | None:
    try:
        return sp.spec_from_json(data)
    except sp.SpecError as exc:
        assert str(exc)
        return None


@FUZZ
@given(st.binary(max_size=200))
def test_arbitrary_bytes_are_a_spec_or_a_spec_error(data):
    parse_or_spec_error(data)


@FUZZ
@given(st.binary(max_size=20))
def test_arbitrary_bytes_inside_a_json_string_are_a_spec_or_a_spec_error(data):
    parse_or_spec_error(b'{"type": "command", "config": {"command": "' + data + b'"}}')


@FUZZ
@given(json_values)
def test_arbitrary_json_values_are_a_spec_or_a_spec_error(value):
    parse_or_spec_error(json.dumps(value))


@FUZZ
@given(spec_shaped)
def test_spec_shaped_objects_are_a_spec_or_a_spec_error(obj):
    parse_or_spec_error(json.dumps(obj))


@FUZZ
@given(st.sampled_from(sp.TASK_TYPES), config_values)
def test_any_config_for_any_task_type_is_a_spec_or_a_spec_error(task_type, config):
    parse_or_spec_error(json.dumps({"type": task_type, "config": config}))


@pytest.mark.parametrize("depth", [60, 63, 200, 5_000, 50_000])
def test_deeply_nested_config_is_a_spec_error_not_a_recursion_error(depth):
    doc = '{"type": "command", "config": {"command": "true", "deep": ' + "[" * depth + "]" * depth + "}}"
    if depth + 2 <= MAX_DEPTH:  # the spec object and its config nest two levels of their own
        assert sp.spec_from_json(doc).config["command"] == "true"
    else:
        with pytest.raises(sp.SpecError, match=f"nested more than {MAX_DEPTH} levels deep"):
            sp.spec_from_json(doc)


task_ids_and_near_misses = st.one_of(
    st.text(max_size=90),
    st.tuples(
        st.from_regex(TOKEN, fullmatch=True),
        st.sampled_from(["", "\n", ".", " ", "*", ">", "\u00e9", "\x00", "a" * 80]),
    ).map("".join),
)


@settings(max_examples=200, deadline=None)
@given(task_ids_and_near_misses)
def test_a_dependency_is_accepted_exactly_when_it_is_a_subject_token(dep):
    doc = json.dumps({"type": "command", "config": {"command": "true"}, "dependencies": [dep]})
    accepted = parse_or_spec_error(doc) is not None
    assert accepted == bool(TOKEN.fullmatch(dep))


def test_a_dependency_with_a_trailing_newline_is_not_a_task_id():
    with pytest.raises(sp.SpecError):
        sp.spec_from_json('{"type": "command", "config": {"command": "true"}, "dependencies": ["t1\\n"]}')


@FUZZ
@given(spec_shaped)
def test_an_accepted_spec_survives_an_encode_decode_round_trip(obj):
    parsed = parse_or_spec_error(json.dumps(obj))
    if parsed is not None:
        assert sp.spec_from_json(msgspec.json.encode(parsed)) == parsed


# --- the seeds' spec files ----------------------------------------------------------------------------

SEED_TEST = {
    "type": "test",
    "priority": 1,
    "config": {"test_file": "/path/to/test_file.py", "test_args": ["--verbose", "--batch-size", "4"]},
    "requirements": {"hardware": ["cuda", "rocm"], "min_memory_gb": 8, "min_cuda_compute": 7.5},
    "timeout_seconds": 1800,
    "retry_policy": {"max_retries": 3, "retry_delay_seconds": 60},
    "dependencies": ["prepare-model-task-123"],
}
SEED_COMMAND = {"type": "command", "config": {"command": "python -m benchmark_script.py --model bert"}}
SEED_BENCHMARK_WITH_COMMAND = {
    "type": "benchmark",
    "priority": 1,
    "config": {
        "command": "python bench.py", "model": "bert-base-uncased", "batch_sizes": [1, 2, 4, 8, 16],
        "precision": "fp16", "iterations": 100,
    },
    "requirements": {"hardware": ["cuda"], "min_memory_gb": 8, "min_cuda_compute": 7.5},
    "timeout_seconds": 1800,
    "retry_policy": {"max_retries": 3, "retry_delay_seconds": 60},
    "dependencies": ["prepare-model-task-123"],
}


def test_the_seeds_test_task_parses_with_every_documented_key():
    spec = sp.spec_from_json(json.dumps(SEED_TEST))
    assert spec.type == "test" and spec.priority == 1 and spec.timeout_seconds == 1800
    assert sp.test_paths(spec) == ["/path/to/test_file.py"]
    assert sp.test_args(spec) == ["--verbose", "--batch-size", "4"]
    assert spec.requirements.hardware == ["cuda", "rocm"]
    assert spec.requirements.min_memory_gb == 8 and spec.requirements.min_cuda_compute == 7.5
    assert spec.retry_policy.max_retries == 3 and spec.retry_policy.retry_delay_seconds == 60
    assert spec.dependencies == ["prepare-model-task-123"]


def test_the_seeds_command_task_parses_with_defaults():
    spec = sp.spec_from_json(json.dumps(SEED_COMMAND))
    assert sp.command_line(spec) == SEED_COMMAND["config"]["command"]
    assert spec.priority == 5 and spec.retry_policy.max_retries == 0 and spec.requirements.hardware == []


def test_a_seeds_benchmark_with_a_command_parses_and_keeps_its_config_as_labels():
    spec = sp.spec_from_json(json.dumps(SEED_BENCHMARK_WITH_COMMAND))
    assert sp.benchmark_labels(spec) == {
        "model": "bert-base-uncased", "batch_sizes": "1,2,4,8,16", "precision": "fp16", "iterations": "100",
    }


def test_a_seeds_benchmark_without_a_command_is_refused_with_a_reason():
    """The seeds ran benchmarks with a built-in runner; dtf runs a command, and says so."""
    seed = {k: v for k, v in SEED_BENCHMARK_WITH_COMMAND.items()}
    seed["config"] = {k: v for k, v in seed["config"].items() if k != "command"}
    with pytest.raises(sp.SpecError, match="config.command"):
        sp.spec_from_json(json.dumps(seed))


def test_a_seeds_hardware_list_with_repeats_parses():
    doc = {"type": "command", "config": {"command": "x"}, "requirements": {"hardware": ["cpu", "cuda", "cpu"]}}
    assert sp.spec_from_json(json.dumps(doc)).requirements.hardware == ["cpu", "cuda", "cpu"]


@pytest.mark.parametrize("doc, reason", [
    ({"type": "multi_device_orchestration", "config": {"command": "x"}}, "type"),
    ({"type": "test", "config": {}}, "config.paths"),
    ({"type": "test", "config": {"test_file": "a.py", "paths": 5}}, "config.paths"),
    ({"type": "test", "config": {"test_file": "a.py", "test_args": "-x"}}, "pytest_args"),
    ({"type": "command", "config": {"command": "  "}}, "config.command"),
    ({"type": "command", "config": {"command": "x"}, "requirements": {"hardware": ["tpu"]}}, "tpu"),
    ({"type": "command", "config": {"command": "x"}, "requirements": {"hardware": "cuda"}}, "hardware"),
    ({"type": "command", "config": {"command": "x"}, "dependencies": ["a.b"]}, "a.b"),
    ({"type": "command", "config": {"command": "x"}, "timeout_seconds": 0}, "timeout_seconds"),
    ({"type": "command", "config": {"command": "x"}, "retry_policy": {"max_retries": -1}}, "max_retries"),
    ({"type": "command", "config": {"command": "x"}, "unknown_key": 1}, "unknown_key"),
])
def test_a_spec_that_cannot_run_is_refused_with_a_one_line_reason(doc, reason):
    with pytest.raises(sp.SpecError, match=re.escape(reason)):
        sp.spec_from_json(json.dumps(doc))
