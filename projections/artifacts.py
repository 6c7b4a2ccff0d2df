"""Fetching the test lists that results keep in the artifacts object store (`ResultReported.tests_ref`).

The projection itself never does I/O besides DuckDB: the async shell (live projector or rebuild) finds
the refs a batch needs and passes the decoded lists to `Projection.apply_batch`.

An object holds the tests as a JSON array of TestOutcome objects, or as JSON lines of them (the
pytest plugin's report format). A missing or unreadable object gives no tests and a warning; any
other error fails the batch, which is then retried.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import InvalidObjectNameError, NotFoundError, ObjectDeletedError

from dtf import events as ev
from dtf import subjects, wire
from dtf.streams.topology import ARTIFACTS_BUCKET

log = logging.getLogger("dtf.projector.artifacts")

_list = msgspec.json.Decoder(list[ev.TestOutcome])
_one = msgspec.json.Decoder(ev.TestOutcome)


class _Refs(msgspec.Struct):
    type: str = ""
    tests: list[object] = []
    tests_ref: str | None = None


_refs = msgspec.json.Decoder(_Refs)


def decode_tests(data: bytes) -> list[ev.TestOutcome]:
    """A stored test list: a JSON array, or JSON lines. Raises wire.WireError on neither."""
    if data.lstrip()[:1] == b"[":
        return wire.decode(data, _list)
    return [wire.decode(line, _one) for line in data.splitlines() if line.strip()]


def refs_in(messages: Iterable) -> set[str]:
    """The tests_ref of every result message that carries no inline tests."""
    refs = set()
    for message in messages:
        if subjects.parse(message.subject).kind != "result":
            continue
        try:
            header = wire.decode(message.data, _refs)
        except wire.WireError:
            continue  # not a result: the fold records why
        if header.type == "ResultReported" and header.tests_ref and not header.tests:
            refs.add(header.tests_ref)
    return refs


async def fetch_tests(js: JetStreamContext, messages: Iterable) -> dict[str, list[ev.TestOutcome]]:
    """tests_ref -> decoded test list for the messages of one batch."""
    refs = refs_in(messages)
    if not refs:
        return {}
    store = await js.object_store(ARTIFACTS_BUCKET)
    found: dict[str, list[ev.TestOutcome]] = {}
    for ref in sorted(refs):
        try:
            result = await store.get(ref)
            found[ref] = decode_tests(result.data or b"")
        except wire.WireError as exc:
            log.warning("test list %s in %s is not readable: %s", ref, ARTIFACTS_BUCKET, exc)
        except (NotFoundError, ObjectDeletedError, InvalidObjectNameError) as exc:
            log.warning("test list %s not found in %s: %s", ref, ARTIFACTS_BUCKET, exc)
        # Anything else (a timeout, a reconnect) propagates: the batch is retried, not applied without
        # its tests, so a live database never differs from a rebuilt one for a passing glitch.
    return found
