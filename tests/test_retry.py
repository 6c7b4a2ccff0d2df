"""The retry policy: which NATS failures are retried, how the back-off grows, and that a publish
which keeps failing reports its failure instead of being dropped."""

import asyncio

import pytest
import tenacity
from nats.errors import AuthorizationError
from nats.js.errors import NoStreamResponseError

from dtf import events as ev
from dtf.spec import TaskSpec
from dtf.streams import bus, retry, topology


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


async def test_submissions_published_while_no_stream_answers_land_once_when_it_comes_back(nc, caplog):
    # No stream yet: the server answers "no responders", as it does while a stream elects its leader.
    js = nc.jetstream()
    events = [ev.TaskSubmitted(id=f"submit-t{i}", run_id="r1", task_id=f"t{i}", submitter="alice",
                               spec=TaskSpec(type="command", config={"command": "true"})) for i in range(3)]
    publishing = asyncio.ensure_future(bus.publish_many(js, events))
    await asyncio.sleep(0.3)  # let the first attempts fail; not a timing assertion
    await topology.provision(js)
    acks = await asyncio.wait_for(publishing, 60)
    assert len(acks) == 3
    assert "attempt 1 failed" in caplog.text  # they were refused first, and retried
    stored = [m async for m in bus.read(js, topology.EVENTS, ["dtf.task.>"])]
    assert sorted(m.subject for m in stored) == [f"dtf.task.r1.t{i}.submitted.alice" for i in range(3)]
