"""Each owner's object-store bucket: a submitter's workspaces, a worker's logs and test lists.

NATS permissions match whole subject tokens, and an object's subjects are `$O.<bucket>.C.<nuid>`
and `$O.<bucket>.M.<base64 name>`: nothing a permission sees names the object's owner, so the owner
is the bucket (`dtf-ws-<submitter>`, `dtf-artifacts-<worker>`, dtf.streams.topology). Each owner
may write only its own (dtf.streams.auth), and readers take the bucket from the event log, never
from a field the writer chose: a workspace from its run owner's bucket (the submitter of
TaskSubmitted, carried by TaskAssigned), a log or test list from the bucket of the worker whose
subject the result arrived on. A forged ref then points only into the forger's own bucket.

Only a coordinator (or an admin) may create streams: a stream's subjects are in the create request's
body, where no permission can see them, and a stream may capture any subject (others' live logs,
others' query replies). So an owner whose bucket does not exist yet asks a coordinator on
`dtf.bucket.<kind>.<owner>` (a subject pinned to its own name); the coordinator makes the bucket with
DTF_EVENTS' replicas, so it survives what the event log survives, and answers. When no coordinator
listens (no responders), a client allowed to create streams (no auth, admin) makes it itself.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import Error as NatsError
from nats.errors import NoRespondersError
from nats.js import JetStreamContext
from nats.js.errors import Error as JetStreamError
from nats.js.errors import NotFoundError
from nats.js.object_store import ObjectStore

from dtf import subjects
from dtf.streams import topology

log = logging.getLogger("dtf.buckets")

REQUEST_TIMEOUT_S = 10.0
"""Creating an R3 stream takes a Raft round; this leaves room for an election too."""
QUEUE = "coordinator"
"""One coordinator replica answers each request (creating is idempotent anyway)."""
NAMES = {"ws": topology.workspaces_bucket, "artifacts": topology.artifacts_bucket}


class BucketError(Exception):
    pass


class _Reply(msgspec.Struct):
    bucket: str = ""
    error: str = ""


def name(kind: str, owner: str) -> str:
    """The bucket of `kind` ("ws" or "artifacts") that belongs to `owner`; ValueError for anything else."""
    if kind not in NAMES or not subjects.is_token(owner):
        raise ValueError(f"no {kind!r} bucket for {owner!r}")
    return NAMES[kind](owner)


async def create(js: JetStreamContext, bucket: str) -> None:
    """Make the bucket unless it exists, with the replicas of DTF_EVENTS (identical configs make
    concurrent creates harmless)."""
    try:
        await js.object_store(bucket)
        return
    except NotFoundError:
        pass
    replicas = (await js.stream_info(topology.EVENTS)).config.num_replicas or 1
    await js.create_object_store(bucket, topology.owner_bucket(bucket, replicas))
    log.info("created bucket %s (R%d)", bucket, replicas)


async def own(nc: Client, js: JetStreamContext, kind: str, owner: str) -> ObjectStore:
    """`owner`'s bucket of `kind`, made first if it does not exist yet (see the module docstring)."""
    bucket = name(kind, owner)
    try:
        return await js.object_store(bucket)
    except NotFoundError:
        pass
    try:
        msg = await nc.request(subjects.bucket_request(kind, owner), b"", timeout=REQUEST_TIMEOUT_S)
    except NoRespondersError:
        await create(js, bucket)  # refused unless this client may create streams
    else:
        reply = msgspec.json.decode(msg.data, type=_Reply)
        if reply.error:
            raise BucketError(f"cannot make bucket {bucket}: {reply.error}")
    return await js.object_store(bucket)


async def serve(nc: Client, js: JetStreamContext) -> None:
    """Answer bucket requests until cancelled: a coordinator's background task. A bad request gets
    an error reply; nothing here ends the service."""

    async def answer(msg: Msg) -> None:
        _, _, kind, owner = (msg.subject.split(".") + ["", "", "", ""])[:4]
        try:
            bucket = name(kind, owner)
            await create(js, bucket)
            body = _Reply(bucket=bucket)
        except ValueError as exc:
            body = _Reply(error=str(exc))
        except (NatsError, JetStreamError, TimeoutError) as exc:
            body = _Reply(error=f"{type(exc).__name__}: {exc}")
        if msg.reply:
            try:
                await msg.respond(msgspec.json.encode(body))
            except NatsError as exc:
                log.debug("cannot answer %s: %s", msg.subject, exc)

    sub = await nc.subscribe(f"{subjects.PREFIX}.bucket.*.*", queue=QUEUE, cb=answer)
    try:
        await asyncio.Future()
    finally:
        await sub.unsubscribe()
