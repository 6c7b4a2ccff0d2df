"""The projector's two durable pull consumers, and the rule that keeps DTF_EVENTS applied in order.

The database checkpoint, not the consumer, is the truth about what is applied: a consumer that is
ahead of the database (the file was deleted or restored from a backup) is recreated to start right
after the checkpoint, and one that is behind (a crash between commit and ack) just redelivers what
the projection then skips.

`skip seq <= checkpoint` is only safe if no message is ever applied before an earlier one. A message
delivered to a pull request that was lost (a stopped process, a fetch that timed out as it arrived)
comes back only after AckWait, behind later ones. So a DTF_EVENTS message after a gap is applied only
once the gap is proven empty (expired or purged); otherwise it is nak'd and waits for the missing one.
DTF_HEARTBEATS needs none of this: it is tracked per subject and older heartbeats change nothing.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from dtf import subjects
from dtf.streams.bus import StoredMsg
from dtf.streams.topology import EVENTS, HEARTBEATS, projector_consumer

log = logging.getLogger("dtf.projector")

HEARTBEATS_DURABLE = "projector-hb"


def heartbeats_consumer() -> ConsumerConfig:
    """Each worker's last heartbeat, then every new one."""
    return ConsumerConfig(
        durable_name=HEARTBEATS_DURABLE,
        filter_subject=subjects.HEARTBEATS,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=60.0,
        max_ack_pending=20_000,
    )


def consumer_for(stream: str) -> ConsumerConfig:
    return projector_consumer() if stream == EVENTS else heartbeats_consumer()


async def ensure_consumer(js: JetStreamContext, stream: str, checkpoint: int) -> str:
    """Create the stream's projector consumer if needed, so it delivers everything after
    `checkpoint`; returns its durable name."""
    config = consumer_for(stream)
    durable = config.durable_name
    assert durable is not None
    try:
        info = await js.consumer_info(stream, durable)
    except NotFoundError:
        info = None
    if info is not None and info.ack_floor.stream_seq <= checkpoint:
        return durable
    if info is not None:
        log.warning(
            "consumer %s acked up to %d but the database is at %d: recreating it",
            durable, info.ack_floor.stream_seq, checkpoint,
        )
        await js.delete_consumer(stream, durable)
    if checkpoint > 0 and config.deliver_policy == DeliverPolicy.ALL:
        config = copy.copy(config)
        config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
        config.opt_start_seq = checkpoint + 1
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


__all__ = [
    "EVENTS", "HEARTBEATS", "HEARTBEATS_DURABLE", "consumer_for", "ensure_consumer", "gap_is_empty",
    "heartbeats_consumer", "in_order",
]
