"""Retry policy for talking to NATS: which failures are worth retrying, and how long to back off.

Publishes retried here keep their Nats-Msg-Id, so JetStream's dedup window makes a repeat harmless:
a publish whose ack was lost during a stream-leader election lands exactly once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import tenacity
from nats.errors import AuthorizationError, NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js.errors import NoStreamResponseError

log = logging.getLogger("dtf.retry")

T = TypeVar("T")

BACKOFF_INITIAL = 0.5
BACKOFF_MAX = 10.0
PUBLISH_ATTEMPTS = 8
"""With the back-off below, about 30 s of retrying: longer than a stream-leader election takes."""


def is_auth_refusal(exc: BaseException) -> bool:
    """The server refused our credentials: retrying cannot help, the caller should give up (exit 3)."""
    if isinstance(exc, AuthorizationError):
        return True
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text


def is_transient_publish_failure(exc: BaseException) -> bool:
    """No stream answered (leader election, no responders) or the ack did not come in time."""
    return isinstance(exc, NoStreamResponseError | NoRespondersError | NatsTimeoutError | asyncio.TimeoutError)


def backoff() -> tenacity.wait.wait_base:
    """Exponential with jitter, capped: 0.5 s, 1 s, 2 s ... 10 s, each plus up to a second of jitter."""
    # Composed rather than wait_exponential_jitter, whose first-wait parameter was renamed in tenacity 9.
    return tenacity.wait_exponential(multiplier=BACKOFF_INITIAL, max=BACKOFF_MAX) + tenacity.wait_random(0, 1.0)


def pause(attempt: int) -> float:
    """The back-off's wait after the `attempt`-th failure in a row (1, 2, ...), for a loop of our own."""
    state = tenacity.RetryCallState(None, None, (), {})
    state.attempt_number = attempt
    return backoff()(state)


def log_attempt(state: tenacity.RetryCallState) -> None:
    exc = state.outcome.exception() if state.outcome else None
    log.warning("nats: attempt %d failed (%s); retrying in %.1fs", state.attempt_number, exc,
                state.next_action.sleep if state.next_action else 0.0)


async def retrying_publish(
    attempt: Callable[[], Awaitable[T]], attempts: int = PUBLISH_ATTEMPTS,
    wait: tenacity.wait.wait_base | None = None,
) -> T:
    """`attempt()` again after each transient failure, backing off, up to `attempts` times; the last
    failure is raised as itself so the caller can report that the submission did not land."""
    retry = tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception(is_transient_publish_failure),
        wait=wait or backoff(), stop=tenacity.stop_after_attempt(attempts),
        before_sleep=log_attempt, reraise=True,
    )
    async for try_ in retry:
        # Python 3.11: nats-py's wait_for can turn our cancellation into a TimeoutError, which must
        # end the retrying, not look like a lost ack (a stopping service would otherwise hang on).
        if (task := asyncio.current_task()) is not None and task.cancelling():
            raise asyncio.CancelledError
        with try_:
            return await attempt()
    raise AssertionError("unreachable: tenacity reraises the last failure")  # pragma: no cover
