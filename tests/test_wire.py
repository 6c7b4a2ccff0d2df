"""The bounded JSON decode every reader uses (`dtf.wire`): its nesting bound agrees with the real
depth of any JSON document, brackets inside strings do not count, deep or unbalanced input is a
WireError with its reason (never a RecursionError), and the answer does not depend on how deep the
caller's stack is, so a live fold and a replay refuse the same messages."""

from __future__ import annotations

import json
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf import events as ev
from dtf import wire
from dtf.limits import MAX_DEPTH

SOME = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

tricky_text = st.text(alphabet='[]{}"\\ ab', max_size=12)
scalars = st.none() | st.booleans() | st.integers() | tricky_text
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(tricky_text, inner, max_size=3), max_leaves=10)


def depth(value) -> int:
    if isinstance(value, list):
        return 1 + max(map(depth, value), default=0)
    if isinstance(value, dict):
        return 1 + max(map(depth, value.values()), default=0)
    return 0


@st.composite
def nested(draw):
    """A document wrapped in up to twice MAX_DEPTH arrays or objects."""
    value = draw(values)
    for _ in range(draw(st.integers(0, 2 * MAX_DEPTH))):
        value = [value] if draw(st.booleans()) else {draw(tricky_text): value}
    return value


@SOME
@given(nested())
def test_the_bound_agrees_with_the_real_depth_of_any_document(value):
    data = json.dumps(value).encode()
    assert (wire.nesting_error(data) is None) == (depth(value) <= MAX_DEPTH)
    if depth(value) <= MAX_DEPTH:
        assert wire.decode(data) == json.loads(data)
    else:
        with pytest.raises(wire.WireError, match=f"nested more than {MAX_DEPTH} levels deep"):
            wire.decode(data)


@SOME
@given(st.binary(max_size=400))
def test_any_bytes_decode_or_raise_a_wire_error_with_a_reason(data):
    try:
        wire.decode(data)
    except wire.WireError as exc:
        assert str(exc)


DEEP = [
    b"[" * 100_000,                                   # 100 KB of brackets, never closed
    b"[" * 10_000 + b"]" * 10_000,                    # 10,000 levels, balanced
    b'{"a":' * 20_000 + b"1" + b"}" * 20_000,
    b'{"type": "TaskSubmitted", "spec": ' + b"[" * 50_000 + b"]" * 50_000 + b"}",
]


@pytest.mark.parametrize("data", DEEP, ids=["brackets", "balanced", "objects", "inside-an-event"])
def test_deep_input_is_refused_with_its_reason_at_any_stack_depth(data):
    def at_depth(frames: int) -> str:
        if frames:
            return at_depth(frames - 1)
        with pytest.raises(wire.WireError) as refused:
            wire.decode(data)
        return str(refused.value)

    frames = sys.getrecursionlimit() - 100  # msgspec alone would give up far sooner this deep
    assert at_depth(0) == at_depth(frames) == f"nested more than {MAX_DEPTH} levels deep"
    with pytest.raises(ev.DecodeError, match="nested more than"):
        ev.decode(data)


def test_brackets_in_strings_and_escaped_quotes_do_not_count():
    inside = json.dumps({"nodeid": "t.py::test[" + "[" * 500 + "]", "q": '\\"[[' * 300}).encode()
    assert wire.nesting_error(inside) is None and wire.decode(inside)["q"].startswith('\\"')


def test_a_long_run_of_quotes_and_backslashes_is_scanned_once():
    # Each unterminated string runs to the end: a scan restarting at every quote would take hours.
    assert wire.nesting_error(b'["' + b'\\"[' * 300_000) is None
    with pytest.raises(wire.WireError):
        wire.decode(b'["' + b'\\"[' * 300_000)
