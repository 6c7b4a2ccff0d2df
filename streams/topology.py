"""Every stream, consumer and object-store bucket dtf uses, declared once and provisioned idempotently.

DTF_EVENTS      task history and worker lifecycle (dtf.task.>, dtf.worker.>): the source of truth.
DTF_HEARTBEATS  dtf.hb.<worker_id>, one message kept per subject: each worker's last heartbeat.
DTF_FEED        dtf.feed.<submitter>.<event subject>: each run's events again under its owner's name,
                which a submitter may read (dtf.streams.feed); kept FEED_MAX_AGE_S.
dtf-ws-<submitter>     one submitter's packed submission directories, named by content hash.
dtf-artifacts-<worker> one worker's full logs and large result lists, referenced from ResultReported.
                       One bucket per owner, so server permissions can pin who writes and reads it
                       (dtf.streams.buckets makes them, dtf.streams.auth pins them).

Consumers: each worker has a durable pull consumer on its own assignment subject (`worker_consumer`);
the projector has one durable on all events (`PROJECTOR`); coordinator replicas and `dtf wait`/`replay`
fold the history through ephemeral ordered consumers, since each needs every event from the start.
"""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.api import (
    AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, ObjectStoreConfig, StorageType,
    StreamConfig,
)
from nats.js.errors import NotFoundError

from dtf import limits, subjects

EVENTS = "DTF_EVENTS"
HEARTBEATS = "DTF_HEARTBEATS"
FEED = "DTF_FEED"
FEED_PREFIX = f"{subjects.PREFIX}.feed"
FEED_MAX_AGE_S = 7 * 24 * 3600.0
"""A submitter follows its runs from the feed for this long; older runs only through the read model."""
WORKSPACES_PREFIX = "dtf-ws-"
ARTIFACTS_PREFIX = "dtf-artifacts-"
PROJECTOR = "projector"

DUPLICATE_WINDOW_S = 120.0
"""Publishes retried within this window with the same Nats-Msg-Id are stored once."""
MAX_MSG_SIZE = limits.MAX_MSG_SIZE
"""The largest event the stream stores (see dtf.limits for what fits inside it)."""
ASSIGNMENT_ACK_WAIT_S = 30.0
"""A worker renews its claim on a running assignment with in-progress acks well inside this."""


WORKER_CONSUMER_IDLE_S = 7 * 24 * 3600.0
"""A worker id not seen for a week loses its durable consumer (and any assignments still in it)."""


def events_stream(replicas: int = 1, max_age_s: float | None = None) -> StreamConfig:
    return StreamConfig(
        name=EVENTS,
        description="dtf task history and worker lifecycle: the source of truth",
        subjects=[subjects.TASKS, subjects.WORKERS],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=max_age_s,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_msg_size=MAX_MSG_SIZE,
        allow_direct=True,
        deny_delete=True,
    )


def heartbeats_stream(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=HEARTBEATS,
        description="dtf worker heartbeats, the last one per worker",
        subjects=[subjects.HEARTBEATS],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_msgs_per_subject=1,
        discard=DiscardPolicy.OLD,
        max_msg_size=64 * 1024,
        allow_direct=True,
    )


def feed_stream(replicas: int = 1) -> StreamConfig:
    return StreamConfig(
        name=FEED,
        description="dtf task events again, under the submitter who owns each run",
        subjects=[f"{FEED_PREFIX}.>"],
        storage=StorageType.FILE,
        num_replicas=replicas,
        max_age=FEED_MAX_AGE_S,
        discard=DiscardPolicy.OLD,
        duplicate_window=DUPLICATE_WINDOW_S,
        max_msg_size=MAX_MSG_SIZE,
    )


def workspaces_bucket(submitter: str) -> str:
    """Where `submitter`'s workspaces are: the run owner's, as its TaskSubmitted subject names it."""
    return f"{WORKSPACES_PREFIX}{submitter}"


def artifacts_bucket(worker_id: str) -> str:
    """Where `worker_id` stores its attempts' logs and test lists: the attempt's assigned worker's."""
    return f"{ARTIFACTS_PREFIX}{worker_id}"


def owner_bucket(bucket: str, replicas: int = 1) -> ObjectStoreConfig:
    return ObjectStoreConfig(bucket=bucket, storage=StorageType.FILE, replicas=replicas)


def worker_consumer(worker_id: str) -> ConsumerConfig:
    """A worker's own queue of assignments. Created before the worker registers, so nothing assigned
    to it can be missed; a restarted worker with the same id gets its unacknowledged ones again."""
    return ConsumerConfig(
        durable_name=f"worker-{worker_id}",
        filter_subject=subjects.assignments_for(worker_id),
        deliver_policy=DeliverPolicy.NEW,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=ASSIGNMENT_ACK_WAIT_S,
        max_ack_pending=1000,
        inactive_threshold=WORKER_CONSUMER_IDLE_S,
    )


def projector_consumer(name: str = PROJECTOR) -> ConsumerConfig:
    """One durable per read-model database: two projectors on one name would split the stream."""
    return ConsumerConfig(
        durable_name=name,
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=60.0,
        max_ack_pending=20_000,
    )


def projector_heartbeats_consumer(name: str = PROJECTOR) -> ConsumerConfig:
    """Each worker's last heartbeat, then every new one (last-per-subject needs a filter subject)."""
    return ConsumerConfig(
        durable_name=f"{name}-hb",
        filter_subject=subjects.HEARTBEATS,
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=60.0,
        max_ack_pending=20_000,
    )


async def _ensure_stream(js: JetStreamContext, config: StreamConfig) -> None:
    """Create the stream, or bring an existing one up to `config`: replicas are only ever raised (a
    process started without --replicas must not shrink an R3 stream) and a None max_age keeps the
    configured retention."""
    try:
        info = await js.stream_info(config.name)
    except NotFoundError:
        await js.add_stream(config)
        return
    current = info.config
    config.num_replicas = max(current.num_replicas or 1, config.num_replicas or 1)
    if config.max_age is None:
        config.max_age = current.max_age
    if (current.subjects, current.num_replicas, current.max_age or 0) != (
        config.subjects, config.num_replicas, config.max_age or 0
    ):
        await js.update_stream(config)


async def provision(js: JetStreamContext, replicas: int = 1, max_age_s: float | None = None) -> None:
    """Create or update every stream; safe to run from every process at every start. `max_age_s`
    None keeps whatever retention the stream has (0 on creation: keep forever). The object-store
    buckets are each owner's, made when first needed (dtf.streams.buckets)."""
    await _ensure_stream(js, events_stream(replicas, max_age_s))
    await _ensure_stream(js, heartbeats_stream(replicas))
    await _ensure_stream(js, feed_stream(replicas))
