"""Reading an object from a dtf bucket without a consumer.

    await objects.get(js, bucket, name)               -> the object's bytes
    await objects.get(js, bucket, name, writeinto=f)  -> b"", the bytes written to `f` (in a thread)

nats-py's `ObjectStore.get` reads an object's chunks through an unnamed ordered consumer, created on
the bare `$JS.API.CONSUMER.CREATE.OBJ_<bucket>` subject, whose consumer name is in the request body
where no permission can see it: whoever may send it may also update another reader's consumer on
that bucket by name. Here the chunks are fetched one by one with the stream's message-get API
(`next_by_subj` from the sequence after the previous chunk), which every bucket reader is granted
anyway for the object's metadata, so no reader needs to create a consumer on a bucket at all.

The meta lookup, a deleted object and the digest check behave as nats-py's `get` (ObjectNotFoundError,
a NotFoundError; DigestMismatchError). dtf never links objects, so a link is refused as bad meta.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
from typing import BinaryIO

from nats.js import JetStreamContext
from nats.js.errors import BadObjectMetaError, DigestMismatchError

DIGEST_PREFIX = "SHA-256="


def stream_of(bucket: str) -> str:
    return f"OBJ_{bucket}"


def chunks_subject(bucket: str, nuid: str) -> str:
    return f"$O.{bucket}.C.{nuid}"


def digest_matches(digest: str, sha256: bytes) -> bool:
    """Whether an ObjectInfo digest (`SHA-256=<urlsafe base64>`, either case) names these bytes' hash."""
    if digest[:len(DIGEST_PREFIX)].upper() != DIGEST_PREFIX:
        return False
    try:
        return base64.urlsafe_b64decode(digest[len(DIGEST_PREFIX):]) == sha256
    except ValueError:
        return False


async def get(js: JetStreamContext, bucket: str, name: str, writeinto: BinaryIO | None = None) -> bytes:
    """The object `name` of `bucket` (or b"" once written into `writeinto`)."""
    info = await (await js.object_store(bucket)).get_info(name)
    if not info.nuid or info.is_link():
        raise BadObjectMetaError
    data, sha = bytearray(), hashlib.sha256()
    subject, seq, size = chunks_subject(bucket, info.nuid), 0, 0
    for _ in range(info.chunks or 0):
        msg = await js.get_msg(stream_of(bucket), seq=seq + 1, subject=subject, next=True)
        chunk = msg.data or b""
        seq = msg.seq or seq + 1
        size += len(chunk)
        sha.update(chunk)
        if writeinto is None:
            data += chunk
        else:
            await asyncio.to_thread(writeinto.write, chunk)
    if size != (info.size or 0) or (info.size and not digest_matches(info.digest or "", sha.digest())):
        raise DigestMismatchError
    return bytes(data)
