"""Where a replay stops (dtf.replay.Cutoff): after sequence N, or before the first event later than T;
a heartbeat counts only if it is not later than the cut."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import given
from hypothesis import strategies as st

from dtf import events as ev
from dtf.replay import Cutoff, event_time

T0 = datetime(2026, 1, 1, tzinfo=UTC)
offsets = st.lists(st.integers(min_value=0, max_value=100), min_size=1, max_size=30)


def log(seconds: list[int]) -> list[tuple[int, bytes]]:
    return [(seq, ev.encode(ev.WorkerLeft(worker_id="w", time=T0 + timedelta(seconds=s))))
            for seq, s in enumerate(seconds, start=1)]


def replayed(messages: list[tuple[int, bytes]], cutoff: Cutoff) -> list[int]:
    kept = []
    for seq, data in messages:
        if cutoff.ends_before(seq, data):
            break
        kept.append(seq)
    return kept


@given(offsets, st.integers(min_value=0, max_value=40))
def test_replaying_to_sequence_n_keeps_exactly_the_first_n_messages(seconds, n):
    assert replayed(log(seconds), Cutoff(upto_seq=n)) == list(range(1, min(n, len(seconds)) + 1))


@given(offsets, st.integers(min_value=0, max_value=100))
def test_replaying_until_t_stops_at_the_first_event_later_than_t(seconds, t):
    kept = replayed(log(seconds), Cutoff(until=T0 + timedelta(seconds=t)))
    first_late = next((i for i, s in enumerate(seconds) if s > t), len(seconds))
    assert kept == list(range(1, first_late + 1))


def test_a_naive_until_is_utc_and_bytes_that_are_no_event_never_end_a_replay():
    cutoff = Cutoff(until=datetime(2026, 1, 1, 0, 0, 5))
    assert not cutoff.ends_before(1, b"not json")
    assert event_time(b"not json") is None
    assert cutoff.ends_before(2, log([6])[0][1])


def test_a_heartbeat_counts_only_up_to_the_cut():
    heartbeat = ev.encode(ev.WorkerHeartbeat(worker_id="w", time=T0 + timedelta(seconds=10)))
    assert Cutoff().heartbeat_counts(heartbeat)  # no cut: the newest heartbeat is the state
    assert not Cutoff(until=T0 + timedelta(seconds=9)).heartbeat_counts(heartbeat)
    by_seq = Cutoff(upto_seq=1)
    for seq, data in log([20, 30]):
        by_seq.ends_before(seq, data)
    assert by_seq.heartbeat_counts(heartbeat)  # the cut is the newest event kept: at 20 s
    assert not by_seq.heartbeat_counts(ev.encode(ev.WorkerHeartbeat(worker_id="w", time=T0 + timedelta(seconds=21))))
