"""Objects read without a consumer (dtf.streams.objects): against a real nats-server, what nats-py's
object store put is read back byte for byte, whole or into a file, across chunk boundaries, after an
overwrite and not after a delete; and no role but the coordinator and admin may create a consumer on
any stream by the bare subject, buckets included."""

from __future__ import annotations

import base64
import hashlib
import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from nats.js.errors import DigestMismatchError, NotFoundError

from dtf.streams import auth, objects, topology

CHUNK = 128 * 1024  # nats-py's default chunk size


@given(st.binary(max_size=300), st.binary(max_size=300), st.booleans())
def test_a_digest_matches_only_the_hash_it_names(data, other, upper):
    digest = "SHA-256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).decode()
    if upper:
        digest = digest.replace("SHA-256=", "sha-256=")
    assert objects.digest_matches(digest, hashlib.sha256(data).digest())
    assert objects.digest_matches(digest, hashlib.sha256(other).digest()) == (data == other)
    assert not objects.digest_matches("MD5=" + digest[8:], hashlib.sha256(data).digest())
    assert not objects.digest_matches("SHA-256=not base64!", hashlib.sha256(data).digest())


@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17])
async def test_an_object_reads_back_byte_for_byte_whole_and_into_a_file(js, size):
    bucket = topology.artifacts_bucket("w1")
    store = await js.create_object_store(bucket, topology.owner_bucket(bucket))
    payload = bytes((i * 7 + size) % 251 for i in range(size))
    await store.put("logs/t/1", payload)
    await store.put("other", b"x" * (CHUNK + 5))  # interleaved chunks of another object are not read
    assert await objects.get(js, bucket, "logs/t/1") == payload
    sink = io.BytesIO()
    assert await objects.get(js, bucket, "logs/t/1", writeinto=sink) == b""
    assert sink.getvalue() == payload


async def test_an_overwritten_object_reads_as_its_new_content_and_a_deleted_one_is_not_found(js):
    bucket = topology.artifacts_bucket("w1")
    store = await js.create_object_store(bucket, topology.owner_bucket(bucket))
    await store.put("log", b"old" * CHUNK)
    await store.put("log", b"new")
    assert await objects.get(js, bucket, "log") == b"new"
    await store.delete("log")
    with pytest.raises(NotFoundError):
        await objects.get(js, bucket, "log")
    with pytest.raises(NotFoundError):
        await objects.get(js, bucket, "never-put")


async def test_a_chunk_that_is_not_what_the_metadata_says_is_a_digest_mismatch(js):
    bucket = topology.artifacts_bucket("w1")
    store = await js.create_object_store(bucket, topology.owner_bucket(bucket))
    info = await store.put("log", b"a" * 10)
    await js.purge_stream(objects.stream_of(bucket), subject=objects.chunks_subject(bucket, info.nuid))
    await js.publish(objects.chunks_subject(bucket, info.nuid), b"b" * 10)  # same size, other bytes
    with pytest.raises(DigestMismatchError):
        await objects.get(js, bucket, "log")


def test_no_role_but_coordinator_and_admin_may_create_a_consumer_by_the_bare_subject_on_any_stream():
    key = "U" + "A" * 55
    users = [auth.User("submitter", "ann", key), auth.User("worker", "w1", key)]
    for role in ("submitter", "worker", "projector", "detector", "viewer"):
        allowed = auth.permissions(role, "x", key, users)["publish"]["allow"]
        bare = [s for s in allowed if s.startswith("$JS.API.CONSUMER.CREATE.") and len(s.split(".")) == 5]
        assert bare == [], (role, bare)
        assert not any(s.startswith("$JS.API.CONSUMER.") and ".OBJ_" in s for s in allowed), role
    reads = auth.permissions("worker", "w1", key, users)["publish"]["allow"]
    assert f"$JS.API.STREAM.MSG.GET.OBJ_{topology.workspaces_bucket('ann')}" in reads  # it still reads them
