"""The projector's two durable pull consumers, and the rule that keeps DTF_EVENTS applied in order.

The database checkpoint, not the consumer, is the truth about what is applied; the consumer is only
a cursor. When a projector (re)binds, a consumer that is ahead of the database (the file was deleted
or restored from a backup) or still has deliveries out to a previous incarnation (a crash, a
cancel: those would only come back after AckWait) is recreated to start right after the checkpoint.
A durable belongs to one projector (one database): two projectors need two names.

`skip seq <= checkpoint` is only safe if no message is ever applied before an earlier one. A message
delivered to a pull request that was lost comes back only after AckWait, behind later ones. So a
DTF_EVENTS message after a gap is applied only once the gap is proven empty (expired or purged);
otherwise it is nak'd and waits for the missing one. DTF_HEARTBEATS needs none of this: it is
tracked per subject and an older heartbeat changes nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from dtf.streams.bus import StoredMsg
from dtf.streams.topology import EVENTS, PROJECTOR, projector_consumer, projector_heartbeats_consumer

log = logging.getLogger("dtf.projector")


def consumer_for(stream: str, name: str = PROJECTOR, checkpoint: int = 0) -> ConsumerConfig:
    """The projector's consumer on `stream`, delivering from just after `checkpoint`."""
    if stream != EVENTS:
        return projector_heartbeats_consumer(name)
    config = projector_consumer(name)
    if checkpoint > 0:
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = checkpoint + 1
    return config


async def ensure_consumer(js: JetStreamContext, stream: str, checkpoint: int, name: str = PROJECTOR) -> str:
    """Make the stream's projector consumer deliver everything after `checkpoint` and nothing that
    waits on another process; returns its durable name."""
    config = consumer_for(stream, name, checkpoint)
    durable = config.durable_name
    assert durable is not None
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        info = None
    if info is not None:
        if info.ack_floor.stream_seq <= checkpoint and info.num_ack_pending == 0:
            return durable
        log.info(
            "%s: consumer %s acked up to %d with %d unacked, the database is at %d: recreating it",
            stream, durable, info.ack_floor.stream_seq, info.num_ack_pending, checkpoint,
        )
        await js.delete_consumer(stream, durable)
    await js.add_consumer(stream, config)
    return durable


async def gap_is_empty(js: JetStreamContext, stream: str, first: int, last: int) -> bool:
    """Whether the stream holds no message with a sequence in [first, last]."""
    try:
        found = await js.get_msg(stream, seq=first, subject=">", next=True)
    except NotFoundError:
        return True
    return found.seq is None or found.seq > last


async def in_order(
    js: JetStreamContext, messages: Sequence[StoredMsg], checkpoint: int,
) -> tuple[list[StoredMsg], list[StoredMsg]]:
    """Split a DTF_EVENTS batch into what can be applied now (in sequence order) and what must wait
    for a missing earlier message."""
    ready: list[StoredMsg] = []
    ordered = sorted(messages, key=lambda m: m.seq)
    expected = checkpoint + 1
    for index, message in enumerate(ordered):
        if message.seq > expected and not await gap_is_empty(js, EVENTS, expected, message.seq - 1):
            log.info("%s: holding seq %d until seq %d arrives", EVENTS, message.seq, expected)
            return ready, ordered[index:]
        ready.append(message)
        expected = max(expected, message.seq + 1)
    return ready, []
