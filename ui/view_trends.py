"""Benchmark trends: one metric series over time, with the detector's findings marked and its
forecast's band (AutoETS, lent by `dtf dashboard`) shaded at the last run and the next ones."""

from __future__ import annotations

from functools import partial
from html import escape

import panel as pn
from bokeh.models import ColumnDataSource, HoverTool

from dtf.ui import model
from dtf.ui.charts import themed_figure, value_ticks
from dtf.ui.session import Session
from dtf.ui.theme import STATUS_COLORS


class TrendsView:
    def __init__(self, session: Session) -> None:
        self.session = session
        self.series = pn.widgets.Select(name="series", options=[], width=640)
        self.points = ColumnDataSource({"time": [], "value": [], "task": [], "run": []})
        self.flagged = ColumnDataSource({"time": [], "value": [], "task": []})
        self.band = ColumnDataSource(model.forecast_band([], {}))
        fig = themed_figure(session.theme, height=280, x_axis_type="datetime")
        fig.varea("time", "lo", "hi", source=self.band, fill_color=STATUS_COLORS["assigned"], fill_alpha=0.25)
        fig.line("time", "mean", source=self.band, line_dash="dashed", color=STATUS_COLORS["assigned"])
        fig.line("time", "value", source=self.points, line_width=2, color=STATUS_COLORS["running"])
        fig.scatter("time", "value", source=self.points, size=7, color=STATUS_COLORS["running"])
        fig.scatter("time", "value", source=self.flagged, size=16, marker="x", line_width=3,
                    color=STATUS_COLORS["failed"], legend_label="anomaly")
        fig.legend.visible = False
        fig.yaxis.formatter = value_ticks()
        fig.y_range.range_padding = 0.15
        fig.y_range.start = 0  # a benchmark's level reads against zero, and one point still gets a scale
        fig.x_range.min_interval = 60_000  # ms: a lone point gets a minute around it, not microseconds
        fig.add_tools(HoverTool(tooltips=[("value", "@value{0.000}"), ("task", "@task"), ("time", "@time{%T}")],
                                formatters={"@time": "datetime"}))
        self.figure = fig
        self.empty = pn.pane.HTML("", stylesheets=[session.stylesheet])
        self.note = pn.pane.HTML("", stylesheets=[session.stylesheet], sizing_mode="stretch_width")
        self.chart = pn.pane.Bokeh(fig, sizing_mode="stretch_width")
        self.panel = pn.Card(self.series, self.empty, self.chart, self.note,
                             title="Benchmark trends", collapsible=False, sizing_mode="stretch_width")
        self._drawn: tuple = ()
        self._forecast: tuple | None = None

    def refresh(self) -> None:
        self._draw_forecast()
        board = self.session.feed.board
        names = sorted(board.series)
        if names != self.series.options:
            self.series.options = names
        if names and self.series.value not in names:
            self.series.value = names[0]
        self.empty.object = "" if names else '<span class="dtf-empty">no benchmark results yet</span>'
        key = self.series.value
        points = board.series.get(key, ())
        stamp = (key, len(points), points[-1].result_id if points else "", len(board.detections))
        if key is None or stamp == self._drawn:
            return
        self._drawn = stamp
        trend = model.trend(board, key)
        self.figure.title.text = key
        self.points.data = {"time": trend.times, "value": trend.values, "task": trend.tasks, "run": trend.runs}
        flagged = trend.flagged
        self.flagged.data = {"time": [trend.times[i] for i in flagged], "value": [trend.values[i] for i in flagged],
                             "task": [trend.tasks[i] for i in flagged]}
        self.figure.legend.visible = bool(flagged)
        pn.state.execute(partial(self._ask_forecast, key, trend.times))

    async def _ask_forecast(self, key: str, times: list) -> None:
        """Wait for the feed's forecast; the next refresh draws it (Bokeh models change only there,
        under the page's document lock)."""
        self._forecast = (key, times, await self.session.feed.forecast(key))

    def _draw_forecast(self) -> None:
        if self._forecast is None:
            return
        key, times, answer = self._forecast
        self._forecast = None
        if self.series.value != key:
            return  # another series was picked meanwhile
        self.band.data = model.forecast_band(times, answer if isinstance(answer, dict) else {})
        self.note.object = f'<span class="muted" data-view="forecast">{escape(model.forecast_note(answer))}</span>'
