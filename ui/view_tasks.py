"""The task queue (in the scheduler's order) and a timeline of attempts per worker."""

from __future__ import annotations

from datetime import timedelta

import panel as pn
from bokeh.models import ColumnDataSource, HoverTool

from dtf.ui import html, model
from dtf.ui.charts import themed_figure
from dtf.ui.session import Session
from dtf.ui.theme import STATUS_COLORS

TIMELINE_WINDOW = timedelta(minutes=30)
"""How far back the timeline looks; older attempts are in Results and Replay."""


def bar_columns(bars: list[model.Bar]) -> dict[str, list]:
    return {
        "worker": [b.worker for b in bars], "task": [b.task for b in bars],
        "start": [b.start for b in bars], "end": [b.end for b in bars], "status": [b.status for b in bars],
        "color": [STATUS_COLORS.get(b.status, "#868e96") for b in bars],
    }


class TasksView:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.queue = pn.pane.HTML("", stylesheets=[session.stylesheet], sizing_mode="stretch_width",
                                  styles={"max-height": "300px", "overflow": "auto"})
        self.source = ColumnDataSource(bar_columns([]))
        self.figure = themed_figure(session.theme, height=260, y_range=[], x_axis_type="datetime",
                                    title="attempts per worker (last 30 min; colour = outcome)")
        self.figure.hbar(y="worker", left="start", right="end", height=0.6, color="color", source=self.source)
        self.figure.add_tools(HoverTool(tooltips=[("task", "@task"), ("worker", "@worker"), ("state", "@status")]))
        self.panel = pn.Row(
            pn.Card(self.queue, title="Task queue", collapsible=False, sizing_mode="stretch_width"),
            pn.Card(pn.pane.Bokeh(self.figure, sizing_mode="stretch_width"), title="Timeline", collapsible=False,
                    sizing_mode="stretch_width"),
            sizing_mode="stretch_width",
        )
        self._workers: list[str] = []

    def refresh(self) -> None:
        s = self.session
        self.queue.object = s.shared("queue", lambda: html.table(
            model.queue_rows(s.feed.board, s.now), "queue", key="task", empty="queue is empty"), per_second=True)
        bars = s.shared("timeline", lambda: model.timeline(s.feed.board, s.now, s.now - TIMELINE_WINDOW),
                        per_second=True)
        workers = sorted({b.worker for b in bars} | {w for w in s.feed.board.fold.workers})
        if workers != self._workers:
            self.figure.y_range.factors = workers
            self._workers = workers
        self.source.data = bar_columns(bars)
