"""Where a replay of the log stops, one rule for `dtf replay`, `dtf replay --db` (a rebuilt read model)
and the dashboard's replay: after stream sequence N, or before the first event later than time T.
A worker's newest heartbeat (the heartbeat stream keeps nothing older) counts only if it is not
later than the cut: T itself, or with N the newest event time before the cut.

Times are read the way `dtf.events.decode` reads them (bounded nesting, an offset required, within
range in UTC): a message whose time is not an event's time never ends a replay, so one bad message
cannot stop or crash a replay of the whole stream; the fold skips it with its reason."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec

from dtf import wire
from dtf.events import Time


class _Time(msgspec.Struct):
    time: Time | None = None


_time_decoder = msgspec.json.Decoder(_Time)


def event_time(data: bytes) -> datetime | None:
    """An event's time, or None for bytes that are not an event (those never end a replay)."""
    try:
        moment = wire.decode(data, _time_decoder).time
        return None if moment is None else moment.astimezone(UTC)
    except (wire.WireError, OverflowError):
        return None


class Cutoff:
    """Feed it the log in stream order (`ends_before`), then ask which heartbeats count."""

    def __init__(self, upto_seq: int | None = None, until: datetime | None = None) -> None:
        self.upto_seq = upto_seq
        self.until = None if until is None else until if until.tzinfo else until.replace(tzinfo=UTC)
        self.last_time: datetime | None = None

    def ends_before(self, seq: int, data: bytes) -> bool:
        """Whether the replay stops before this message (and so before all that follow it)."""
        if self.upto_seq is not None and seq > self.upto_seq:
            return True
        moment = event_time(data)
        if self.until is not None and moment is not None and moment > self.until:
            return True
        if moment is not None:
            self.last_time = moment if self.last_time is None else max(self.last_time, moment)
        return False

    def heartbeat_counts(self, data: bytes) -> bool:
        limit = self.until if self.until is not None else (self.last_time if self.upto_seq is not None else None)
        if limit is None:
            return True
        moment = event_time(data)
        return moment is not None and moment <= limit
