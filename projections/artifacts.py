"""Fetching the test lists that results keep in the artifacts object store (`ResultReported.tests_ref`).

The projection itself never does I/O besides DuckDB: the async shell (live projector or rebuild) finds
the refs a batch needs and passes the decoded lists to `Projection.apply_batch`.

An object holds the tests as a JSON array of TestOutcome objects, or as JSON lines of them (the
pytest plugin's report format). A missing or unreadable object gives no tests and a warning; any
other error fails the batch, which is then retried.

A list is looked up as (worker, ref), in the bucket of the worker whose subject the result came on
(`dtf-artifacts-<worker>`, which only that worker may write): a result naming another worker's ref
finds nothing of that worker's.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import msgspec
from nats.js import JetStreamContext
from nats.js.errors import InvalidObjectNameError, NotFoundError, ObjectDeletedError

from dtf import events as ev
from dtf import subjects, wire
from dtf.streams import objects
from dtf.streams.topology import artifacts_bucket

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


Stored = tuple[str, str]
"""(worker, tests_ref): a test list in that worker's bucket."""


def refs_in(messages: Iterable) -> set[Stored]:
    """(worker, tests_ref) of every result message that carries no inline tests."""
    refs = set()
    for message in messages:
        parsed = subjects.parse(message.subject)
        if parsed.kind != "result" or not subjects.is_token(parsed.party):
            continue
        try:
            header = wire.decode(message.data, _refs)
        except wire.WireError:
            continue  # not a result: the fold records why
        if header.type == "ResultReported" and header.tests_ref and not header.tests:
            refs.add((parsed.party, header.tests_ref))
    return refs


async def fetch_tests(js: JetStreamContext, messages: Iterable) -> dict[Stored, list[ev.TestOutcome]]:
    """(worker, tests_ref) -> decoded test list for the messages of one batch."""
    found: dict[Stored, list[ev.TestOutcome]] = {}
    for worker, ref in sorted(refs_in(messages)):
        bucket = artifacts_bucket(worker)
        try:
            found[(worker, ref)] = decode_tests(await objects.get(js, bucket, ref))
        except wire.WireError as exc:
            log.warning("test list %s in %s is not readable: %s", ref, bucket, exc)
        except (NotFoundError, ObjectDeletedError, InvalidObjectNameError) as exc:
            log.warning("test list %s not found in %s: %s", ref, bucket, exc)
        # Anything else (a timeout, a reconnect) propagates: the batch is retried, not applied without
        # its tests, so a live database never differs from a rebuilt one for a passing glitch.
    return found
