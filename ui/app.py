"""The Panel app: one page per tab, all fed by the process's one `Feed`.

Each tab gets a periodic callback (TICK_MS) that looks at the board's version and re-renders its
views only when the board moved (or a second passed, for the ages): the feed pushes events into
the board as they arrive, the tab picks them up within a tick, and nothing in a tab talks to NATS
except a drill-down or a replay someone asked for.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import panel as pn
from nats.aio.client import Client

from dtf.ui import html, model
from dtf.ui.board import SeriesOf, metric_series
from dtf.ui.feed import Feed, Forecaster
from dtf.ui.session import Session, SharedCache
from dtf.ui.theme import theme_of
from dtf.ui.view_alerts import AlertsView
from dtf.ui.view_replay import ReplayView
from dtf.ui.view_results import ResultsView
from dtf.ui.view_tasks import TasksView
from dtf.ui.view_trends import TrendsView
from dtf.ui.view_workers import WorkersView

TICK_MS = 300


def page(feed: Feed, cache: SharedCache) -> pn.template.BootstrapTemplate:
    """One tab's page."""
    session = Session(feed, theme_of(pn.state.session_args), cache)
    workers, alerts, tasks = WorkersView(session), AlertsView(session), TasksView(session)
    results, trends, replay = ResultsView(session), TrendsView(session), ReplayView(session)
    views = [workers, alerts, tasks, results, trends, replay]
    strip = pn.pane.HTML("", stylesheets=[session.stylesheet], sizing_mode="stretch_width")
    shown: list[tuple] = [()]

    def tick() -> None:
        session.now = datetime.now(UTC)
        stamp = (feed.board.version, int(session.now.timestamp()))
        if stamp == shown[0]:
            return
        shown[0] = stamp
        strip.object = session.shared("strip", lambda: status_strip(feed))
        for view in views:
            view.refresh()

    tick()
    pn.state.add_periodic_callback(tick, period=TICK_MS)
    return pn.template.BootstrapTemplate(
        title="dtf", header_background="#1c7ed6", main_max_width="1500px", header=[theme_toggle(session.theme)],
        main=[strip, pn.Row(workers.panel, alerts.panel, sizing_mode="stretch_width"), tasks.panel,
              results.panel, trends.panel, replay.panel],
    )


def theme_toggle(theme: str) -> pn.widgets.Button:
    """Light/dark: reload the page with the other ?theme= (the template reads it), as Panel's own toggle does."""
    other = "default" if theme == "dark" else "dark"
    button = pn.widgets.Button(name="light theme" if theme == "dark" else "dark theme", button_type="light",
                               width=120, align="end", css_classes=["dtf-theme-toggle"])
    button.js_on_click(code=f"const u = new URL(window.location.href); u.searchParams.set('theme', '{other}');"
                            " window.location.href = u.toString();")
    return button


def status_strip(feed: Feed) -> str:
    items = model.summary_tiles(feed.board)
    if not feed.caught_up.is_set():
        items.append(("catching up with the log", "...", "pending"))
    return html.tiles(items)


async def serve(nc: Client, stop: asyncio.Event, *, port: int, address: str, origins: list[str],
                series_of: SeriesOf = metric_series, forecaster: Forecaster | None = None) -> None:
    """Serve the dashboard on this loop until `stop`: Bokeh's server runs on the running asyncio loop,
    beside the feed, so a tab's callbacks and the feed never need a lock between them. `series_of`
    and `forecaster` are the detector's series naming and forecast, lent by the composition root."""
    feed, cache = Feed(nc, series_of, forecaster), SharedCache()

    def new_tab() -> pn.template.BootstrapTemplate:
        return page(feed, cache)

    server = pn.serve({"/": new_tab}, port=port, address=address, show=False,
                      start=False, title="dtf", websocket_origin=origins or [f"{address}:{port}", f"localhost:{port}"])
    server.start()
    try:
        await feed.run(stop)
    finally:
        server.stop()
