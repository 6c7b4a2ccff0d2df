"""When a worker with `--exit-when-idle` has been idle long enough to leave: a worker lent to the
fleet by a CI job (a self-hosted GPU runner) gives the runner back once the work has dried up."""

from __future__ import annotations


def idle_since(previous: float | None, busy: bool, now: float) -> float | None:
    """When the current idle spell began: None while busy (something assigned or running), else the
    start of the spell, which is `now` when it only just began."""
    if busy:
        return None
    return now if previous is None else previous


def should_exit(since: float | None, now: float, limit: float | None) -> bool:
    """Idle for at least `limit` seconds (no limit: never)."""
    return limit is not None and since is not None and now - since >= limit
