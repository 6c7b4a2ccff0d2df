"""Fuzzing the decoders, the task-spec parser and the CLI's spec loader (bench/fuzz.py runs the same
checks with 10,000 inputs each): every input is accepted and round-trips, or is rejected with a
reason; nothing else happens."""

from __future__ import annotations

import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import fuzz
from dtf import events as ev
from dtf.state import Fold

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(fuzz.event_inputs)
def test_any_bytes_decode_to_an_event_or_a_decode_error_with_a_reason(data):
    fuzz.check_event(data)


@FUZZ
@given(fuzz.fold_inputs)
def test_any_message_on_any_subject_is_folded_or_refused_with_a_reason(subject_and_data):
    fuzz.check_fold(subject_and_data)


@FUZZ
@given(fuzz.hostile)
def test_oversize_deep_and_offsetless_events_are_refused_with_a_reason_and_decide_nothing_too_big(data):
    fuzz.check_event(data)
    verdict = fuzz.check_fold(("dtf.task.run-1.run-1-1.submitted.alice", data))
    assert verdict != "accepted"  # too big, too deep, timeless, or (within the limits) a task id taken
    if len(data) > fuzz.MAX_SUBMISSION_BYTES:
        assert verdict.startswith("submission is")
    fuzz.check_replay(data)


@FUZZ
@given(fuzz.event_inputs)
def test_any_message_has_an_event_time_for_a_replay_or_none(data):
    fuzz.check_replay(data)


@FUZZ
@given(fuzz.spec_inputs)
def test_any_bytes_parse_to_a_valid_spec_or_a_spec_error_with_a_reason(data):
    fuzz.check_spec(data)


SPEC_FILE = fuzz.SpecFile()


@settings(FUZZ, max_examples=150)
@given(fuzz.spec_inputs)
def test_the_cli_spec_loader_turns_any_file_into_specs_or_a_one_line_error(data):
    SPEC_FILE(data)


def test_found_by_fuzzing_deep_nesting_and_an_empty_list_are_clean_spec_file_errors():
    for data in (b"[" * 50_000 + b"]" * 50_000, b"[]",
                 b'{"type": "test", "config": {"paths": ["a"]}, "requirements": {"x\\ny": 1}}'):
        assert SPEC_FILE(data) != "accepted"


def test_a_refused_submission_is_kept_with_its_reason_for_the_coordinators_rejection():
    fold = Fold()
    garbage = b'{"type": "TaskSubmitted", "v": 2, "id": "x", "time": "2026-01-01T00:00:00Z", "spec": 7}'
    applied = fold.apply("dtf.task.run-1.run-1-1.submitted.alice", 1, garbage)
    assert applied.event is None and applied.invalid_reason
    kept = fold.invalid[1]
    assert (kept.raw, kept.reason) == (garbage, applied.invalid_reason)


def test_the_sample_events_the_fuzzer_mutates_are_themselves_valid():
    for event in fuzz.EVENTS:
        assert ev.decode(ev.encode(event)) == event
        assert fuzz.check_event(ev.encode(event)) == "accepted"
