"""Properties of the projection over generated deliveries of the sample history: however the messages
are batched, redelivered, duplicated or interleaved where order does not matter, the tables come out
the same as applying the history once, in order, in one batch."""

import itertools
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf.projections import sample, schema
from dtf.projections.projection import Projection
from dtf.streams.bus import StoredMsg
from dtf.streams.topology import EVENTS, HEARTBEATS

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
R1, R2 = sample.history("r1"), sample.history("r2")
TESTS = R1.tests() | R2.tests()


def project(batches, path=None, restart_after=()):
    """Apply batches in order (reopening the database after the batch indexes in `restart_after`)
    and return every table's contents."""
    projection = Projection.open(path or ":memory:")
    try:
        for index, batch in enumerate(batches):
            projection.apply_batch(batch, TESTS)
            if path is not None and index in restart_after:
                projection.close()
                projection = Projection.open(path)
        return schema.contents(projection.con)
    finally:
        projection.close()


def without_sequences(contents):
    """The tables minus what only says where in a stream a message sat."""
    dropped = {}
    for table in schema.TABLES:
        if table is schema.CHECKPOINTS:
            continue
        keep = [i for i, name in enumerate(table.column_names) if name != "seq"]
        dropped[table.name] = sorted(
            (tuple(row[i] for i in keep) for row in contents[table.name]), key=repr,
        )
    return dropped


def restamp(messages):
    """The messages as a fresh stream pair would number them."""
    counters = {EVENTS: 0, HEARTBEATS: 0}
    stamped = []
    for m in messages:
        counters[m.stream] += 1
        stamped.append(StoredMsg(m.stream, counters[m.stream], m.subject, m.data))
    return stamped


def split(messages, cuts):
    bounds = sorted({0, len(messages), *(c % (len(messages) + 1) for c in cuts)})
    return [messages[a:b] for a, b in itertools.pairwise(bounds)]


ONCE = project([R1.stored()])
ADMITTED = {
    seq for stream, seq, *_ in ONCE["events"] if stream == EVENTS
}
"""DTF_EVENTS sequences of the events the projection admitted (garbage has no id to dedupe by)."""


@SETTINGS
@given(st.data())
def test_events_stored_again_change_nothing_but_sequence_numbers(data):
    events = [m for m in R1.stored() if m.stream == EVENTS]
    heartbeats = [m for m in R1.stored() if m.stream == HEARTBEATS]
    stream = []
    for position, message in enumerate(events):
        stream.append(message)
        earlier = [m for m in events[: position + 1] if m.seq in ADMITTED]
        stream += data.draw(st.lists(st.sampled_from(earlier), max_size=2), label=f"again after {position}")
    cuts = data.draw(st.lists(st.integers(0, 200), max_size=6), label="cuts")
    delivered = split(restamp(stream + heartbeats), cuts)
    assert without_sequences(project(delivered)) == without_sequences(ONCE)


@SETTINGS
@given(st.data())
def test_batching_restarts_and_redelivery_do_not_change_the_tables(data):
    events = [m for m in R1.stored() if m.stream == EVENTS]
    heartbeats = data.draw(st.permutations([m for m in R1.stored() if m.stream == HEARTBEATS]))
    # Heartbeats interleave anywhere with the in-order events (they come from their own consumer).
    slots = data.draw(st.lists(st.integers(0, len(events)), min_size=len(heartbeats),
                               max_size=len(heartbeats)), label="heartbeat slots")
    merged = list(events)
    for slot, heartbeat in sorted(zip(slots, heartbeats), key=lambda pair: -pair[0]):
        merged.insert(slot, heartbeat)
    batches = split(merged, data.draw(st.lists(st.integers(0, 100), max_size=8), label="cuts"))
    delivered = []
    for index, batch in enumerate(batches):
        already = [m for b in batches[:index] for m in b]
        redelivered = data.draw(st.lists(st.sampled_from(already), max_size=5) if already else st.just([]))
        at = data.draw(st.integers(0, len(batch)), label="redelivered at")
        delivered.append(batch[:at] + redelivered + batch[at:])
    restarts = set(data.draw(st.lists(st.integers(0, len(delivered)), max_size=3), label="restarts"))
    with tempfile.TemporaryDirectory() as directory:
        got = project(delivered, Path(directory) / "p.duckdb", restarts)
    assert got == ONCE


@SETTINGS
@given(st.data())
def test_runs_that_share_nothing_can_interleave_in_any_order(data):
    first = [m for m in R1.stored() if m.stream == EVENTS]
    second = [m for m in R2.stored() if m.stream == EVENTS]
    picks = data.draw(st.permutations([0] * len(first) + [1] * len(second)), label="interleaving")
    queues = [list(first), list(second)]
    merged = [queues[pick].pop(0) for pick in picks]
    reference = project([restamp(first + second)])
    assert without_sequences(project([restamp(merged)])) == without_sequences(reference)
