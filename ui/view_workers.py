"""Workers: capabilities, state, current tasks, heartbeat age, quarantine."""

from __future__ import annotations

import panel as pn

from dtf.ui import html, model
from dtf.ui.session import Session


class WorkersView:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.table = pn.pane.HTML("", stylesheets=[session.stylesheet], sizing_mode="stretch_width")
        self.panel = pn.Card(self.table, title="Workers", collapsible=False, sizing_mode="stretch_width")

    def refresh(self) -> None:
        s = self.session
        self.table.object = s.shared("workers", lambda: html.table(
            model.worker_rows(s.feed.board, s.now), "workers", key="worker",
            empty="no worker has registered yet"), per_second=True)
