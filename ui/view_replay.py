"""Replay: the workers and tasks as they were after sequence N or at a time, and one task's history."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from html import escape

import panel as pn
from nats.errors import Error as NatsError
from nats.js.errors import Error as JetStreamError

from dtf import subjects
from dtf.ui import html, model
from dtf.ui.board import Board
from dtf.ui.replay import board_at, task_history
from dtf.ui.session import Session


def parse_until(text: str) -> datetime | None:
    """An ISO-8601 time (UTC when it names no zone); ValueError for anything else."""
    if not text.strip():
        return None
    parsed = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


class ReplayView:
    def __init__(self, session: Session) -> None:
        self.session = session
        sheet = [session.stylesheet]
        self.upto = pn.widgets.IntInput(name="up to sequence", value=None, start=1, width=160)
        self.until = pn.widgets.TextInput(name="or at time (ISO-8601, UTC)", placeholder="2026-01-31T12:00:00",
                                          width=240)
        self.task = pn.widgets.TextInput(name="task id (its history)", width=300)
        self.go = pn.widgets.Button(name="Replay", button_type="primary", width=110, align="end")
        self.go.on_click(self._replay)
        self.result = pn.pane.HTML('<span class="muted">pick a sequence, a time or a task, then Replay</span>',
                                   stylesheets=sheet, sizing_mode="stretch_width")
        self.panel = pn.Card(pn.Row(self.upto, self.until, self.task, self.go), self.result,
                             title="Replay", collapsible=False, sizing_mode="stretch_width")

    def refresh(self) -> None:
        """Nothing live: a replay shows the past, and changes only when asked again."""

    async def _replay(self, _event=None) -> None:
        feed = self.session.feed
        try:
            until = parse_until(self.until.value)
        except ValueError:
            self.result.object = f'<span class="dtf-empty">{self.until.value!r} is not an ISO-8601 time</span>'
            return
        upto = self.upto.value or None
        task_id = self.task.value.strip()
        if task_id and not subjects.is_token(task_id):
            self.result.object = f'<span class="dtf-empty">{escape(task_id)!r} is not a task id</span>'
            return
        try:
            messages = await feed.history(upto_seq=upto)
            its_events = await feed.history([subjects.task_any_run(task_id)], upto_seq=upto) if task_id else []
        except (NatsError, JetStreamError, TimeoutError) as exc:
            self.result.object = f'<span class="dtf-empty">cannot read the log: {escape(str(exc))}</span>'
            return
        # Folding thousands of events is real work: off the loop, so other tabs stay live.
        board = await asyncio.to_thread(board_at, messages, dict(feed.heartbeats), upto_seq=upto, until=until,
                                        series_of=feed.board.series_of)
        now = until or datetime.now(UTC)
        where = f"after sequence {board.last_seq}" + (f" (as of {until:%Y-%m-%d %H:%M:%S} UTC)" if until else "")
        parts = [f"<h4>State {where}</h4>", html.tiles(model.summary_tiles(board))]
        if task_id:
            history = [{"seq": line.seq, "time": f"{line.time:%H:%M:%S.%f}"[:-3] if line.time else "-",
                        "event": line.type, "detail": line.detail}
                       for line in task_history(its_events, task_id)
                       if line.seq <= board.last_seq]
            parts += [f"<h4>Task {task_id}</h4>", html.table(history, "replay-history", key="seq",
                                                             empty=f"no events of task {task_id} by then")]
        parts += ["<h4>Workers</h4>", html.table(model.worker_rows(board, now), "replay-workers", key="worker"),
                  "<h4>Tasks</h4>", html.table(all_tasks(board), "replay-tasks", key="task")]
        self.result.object = "".join(parts)


def all_tasks(board: Board, limit: int = 200) -> list[dict]:
    runs = [row["run"] for row in model.run_rows(board)]
    return [row for run in runs for row in model.task_rows(board, run)][:limit]
