"""The retry policy: which NATS failures are retried, how the back-off grows, and that a publish
which keeps failing reports its failure instead of being dropped."""

import asyncio

import pytest
import tenacity
from nats.errors import AuthorizationError
from nats.js.errors import NoStreamResponseError

from dtf.streams import retry


def test_refused_credentials_are_recognised_and_not_retried():
    assert retry.is_auth_refusal(AuthorizationError())
    assert retry.is_auth_refusal(Exception("nats: 'Authorization Violation'"))
    assert not retry.is_transient_publish_failure(AuthorizationError())


def test_a_missing_stream_response_or_a_lost_ack_is_transient():
    assert retry.is_transient_publish_failure(NoStreamResponseError())
    assert retry.is_transient_publish_failure(asyncio.TimeoutError())


def test_the_back_off_grows_and_is_capped():
    wait = retry.backoff()

    class State:
        def __init__(self, n):
            self.attempt_number = n

    waits = [wait(State(n)) for n in range(1, 12)]
    assert waits[0] < retry.BACKOFF_MAX
    assert all(w <= retry.BACKOFF_MAX + 1.0 for w in waits)


async def test_a_publish_that_recovers_is_retried_until_it_lands():
    calls = []

    async def attempt():
        calls.append(1)
        if len(calls) < 3:
            raise NoStreamResponseError()
        return "ack"

    assert await retry.retrying_publish(attempt, wait=tenacity.wait_none()) == "ack"
    assert len(calls) == 3


async def test_a_publish_that_never_recovers_raises_its_failure():

    async def attempt():
        raise NoStreamResponseError()

    with pytest.raises(NoStreamResponseError):
        await retry.retrying_publish(attempt, attempts=2, wait=tenacity.wait_none())
