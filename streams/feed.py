"""The owner feed: each run's events again, under the name of the submitter who owns the run.

A submitter may not read DTF_EVENTS (its subjects name no owner, see dtf.streams.auth), so the
coordinator, which folds every run's owner anyway, republishes each event of an owned run to
`dtf.feed.<owner>.<original subject>` in DTF_FEED (a submission and its rejection to their sender's
feed instead, `reader_of`), with the original bytes and the original stream
sequence as Nats-Msg-Id. The server lets a submitter create only consumers filtered to its own
prefix (the filtered `$JS.API.CONSUMER.CREATE.DTF_FEED.<consumer>.<filter>` form, where the filter
is in the subject a permission sees) and named from its own pool (`f-<key>-<k>`, dtf.streams.reader),
and `read` strips the prefix again, so every reader folds the
same subjects and sequences whichever stream it reads.

Coordinator replicas all republish; the stream's dedup window drops the copies, and a coordinator
that starts again resumes after the last sequence the feed holds.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping

from nats.errors import Error as NatsError
from nats.js import JetStreamContext
from nats.js.errors import Error as JetStreamError

from dtf import admission, subjects
from dtf import events as ev
from dtf.streams import bus, reader, topology

log = logging.getLogger("dtf.feed")

WINDOW = 256
"""Republishes in flight at once."""
RETRY_S = 0.5


def feed_subject(owner: str, subject: str) -> str:
    return f"{topology.FEED_PREFIX}.{owner}.{subject}"


def original_subject(owner: str, subject: str) -> str:
    return subject.removeprefix(f"{topology.FEED_PREFIX}.{owner}.")


def republished(subject: str, owner: str | None) -> bool:
    """Whether a DTF_EVENTS message goes to the feed: a task event of a run with a known owner."""
    return owner is not None and subject.startswith(f"{subjects.PREFIX}.task.")


def reader_of(subject: str, event: ev.Event | None, owners: Mapping[str, str]) -> str | None:
    """Whose feed a DTF_EVENTS message goes to: its run's owner, except a submission and its
    rejection, which go to the submitter who sent it. So a submission into another's run, refused on
    the record, is seen by its sender (its `--wait` ends "rejected", with the reason) and not by the
    run's owner, to whose run it never belonged."""
    parsed = subjects.parse(subject)
    if parsed.kind == "submitted" and parsed.party:
        return parsed.party
    if isinstance(event, ev.TaskRejected) and (sender := admission.rejected_submitter(event)):
        return sender
    return owners.get(parsed.run_id)


async def read(js: JetStreamContext, filter_: str, scope: str | None, *, follow: bool = False,
               ) -> AsyncIterator[bus.StoredMsg]:
    """DTF_EVENTS messages on one filter subject, as every reader sees them: straight from the stream
    (scope None), or from submitter `scope`'s own feed, as the original subjects and sequences."""
    if scope is None:
        async for msg in bus.read(js, topology.EVENTS, [filter_], follow=follow):
            yield msg
        return
    # One filter subject: the reader asks on the filtered create subject, the only one a submitter may
    # use, under a name from its own feed pool.
    async for msg in bus.read(js, topology.FEED, [feed_subject(scope, filter_)], follow=follow,
                              prefix=reader.FEED_READER):
        seq = int(msg.msg_id) if msg.msg_id.isdigit() else msg.seq
        yield bus.StoredMsg(topology.EVENTS, seq, original_subject(scope, msg.subject), msg.data, msg.pending)


async def last_fed(js: JetStreamContext) -> int:
    """The DTF_EVENTS sequence of the feed's last message (0 for an empty feed)."""
    last = (await js.stream_info(topology.FEED)).state.last_seq
    if last == 0:
        return 0
    msg = await js.get_msg(topology.FEED, last)
    return int((msg.headers or {}).get("Nats-Msg-Id", "0"))


class OwnerFeed:
    """Republishes what `offer` is given, in order, from `run` (a task its owner cancels)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js
        self.after = 0
        self.queue: asyncio.Queue[tuple[str, int, bytes]] = asyncio.Queue()

    async def resume(self) -> None:
        self.after = await last_fed(self.js)

    def offer(self, subject: str, seq: int, data: bytes, owner: str | None) -> None:
        if seq > self.after and republished(subject, owner):
            self.queue.put_nowait((feed_subject(owner, subject), seq, data))  # type: ignore[arg-type]

    async def run(self) -> None:
        while True:
            batch = [await self.queue.get()]
            while not self.queue.empty() and len(batch) < WINDOW:
                batch.append(self.queue.get_nowait())
            while batch:
                batch = await self._publish(batch)
                if batch:
                    await asyncio.sleep(RETRY_S)

    async def _publish(self, batch: list[tuple[str, int, bytes]]) -> list[tuple[str, int, bytes]]:
        """Publish `batch` pipelined; returns the ones to try again (same id: a stored one is dropped)."""
        futures = []
        try:
            for subject, seq, data in batch:
                futures.append(await self.js.publish_async(subject, data, headers={"Nats-Msg-Id": str(seq)}))
        except (NatsError, JetStreamError, TimeoutError) as exc:
            log.warning("feed: %s", exc)
        acks = await asyncio.gather(*futures, return_exceptions=True)
        failed = [item for item, ack in zip(batch, acks) if isinstance(ack, BaseException)]
        if failed:
            why = next(ack for ack in acks if isinstance(ack, BaseException))
            log.warning("feed: %d republishes failed (%s); retrying", len(failed), why)
        return failed + batch[len(futures):]
