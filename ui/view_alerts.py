"""Alerts: lost and quarantined workers, missed deadlines, rejected and errored tasks, the
regressions and anomalies the detector reported, and flaky tests."""

from __future__ import annotations

import panel as pn

from dtf.ui import html, model
from dtf.ui.session import Session


class AlertsView:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.table = pn.pane.HTML("", stylesheets=[session.stylesheet], sizing_mode="stretch_width",
                                  styles={"max-height": "340px", "overflow": "auto"})
        self.panel = pn.Card(self.table, title="Alerts", collapsible=False, sizing_mode="stretch_width")

    def refresh(self) -> None:
        s = self.session
        self.table.object = s.shared("alerts", lambda: html.table(
            model.alert_rows(s.feed.board, s.now, s.feed.flaky), "alerts", empty="all quiet"), per_second=True)
