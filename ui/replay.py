"""Replay in the UI: the board as it was after stream sequence N or at time T, and one task's history.

The same cut-off as `dtf replay` and `dtf replay --db` (dtf.replay.Cutoff): stop after sequence N, or
before the first event later than T; a worker's newest heartbeat counts only if it is not later than
the cut (the heartbeat stream keeps nothing older). The feed reads the stored log for
it (`Feed.history`); these functions fold what it read, off the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

import msgspec

from dtf import events as ev
from dtf import subjects
from dtf.replay import Cutoff
from dtf.ui.board import Board, SeriesOf, Stored, metric_series


def cut(messages: Iterable[Stored], cutoff: Cutoff) -> Iterator[Stored]:
    """The messages up to the cut-off, in stream order."""
    for message in messages:
        if cutoff.ends_before(message.seq, message.data):
            return
        yield message


def board_at(messages: Iterable[Stored], heartbeats: Mapping[str, bytes], *, upto_seq: int | None = None,
             until: datetime | None = None, series_of: SeriesOf = metric_series) -> Board:
    """A fresh board folded from the log up to the cut-off (with the heartbeats not later than it)."""
    board = Board(series_of)
    cutoff = Cutoff(upto_seq, until)
    for message in cut(messages, cutoff):
        board.apply(message.subject, message.seq, message.data)
    for subject, data in heartbeats.items():
        if cutoff.heartbeat_counts(data):
            board.apply_heartbeat(subject, data)
    return board


@dataclass(frozen=True)
class HistoryLine:
    seq: int
    time: datetime | None
    type: str
    detail: str


_DETAIL_FIELDS = ("worker_id", "attempt", "outcome", "category", "reason", "submitter", "status", "by")


def task_history(messages: Iterable[Stored], task_id: str) -> list[HistoryLine]:
    """Every message on the task's subjects, as `dtf replay --task` lists them."""
    lines = []
    for message in messages:
        if subjects.parse(message.subject).task_id != task_id:
            continue
        try:
            event = ev.decode(message.data)
        except ev.DecodeError as exc:
            lines.append(HistoryLine(message.seq, None, "Invalid", str(exc)))
            continue
        body = msgspec.to_builtins(event)
        detail = " ".join(f"{k}={body[k]}" for k in _DETAIL_FIELDS if body.get(k) not in (None, "", 0))
        lines.append(HistoryLine(message.seq, event.time, type(event).__name__, detail))
    return lines
