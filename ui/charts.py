"""Bokeh figures styled for the tab's theme (Panel's own theming does not reach every colour)."""

from __future__ import annotations

from typing import Any

from bokeh.models import DatetimeTickFormatter, NumeralTickFormatter
from bokeh.plotting import figure

from dtf.ui.theme import PALETTES


def themed_figure(theme: str, **options: Any) -> figure:
    p = PALETTES[theme]
    fig = figure(sizing_mode="stretch_width", toolbar_location="above", tools="pan,xwheel_zoom,reset,save",
                 background_fill_color=p["bg"], border_fill_color=p["bg"], outline_line_color=p["line"], **options)
    for axis in (fig.xaxis, fig.yaxis):
        axis.axis_label_text_color = p["muted"]
        axis.major_label_text_color = p["fg"]
        axis.axis_line_color = p["line"]
        axis.major_tick_line_color = p["line"]
        axis.minor_tick_line_color = None
    fig.xgrid.grid_line_color = p["line"]
    fig.ygrid.grid_line_color = p["line"]
    fig.title.text_color = p["fg"]
    if options.get("x_axis_type") == "datetime":
        fig.xaxis.formatter = DatetimeTickFormatter(
            milliseconds="%H:%M:%S.%3N", seconds="%H:%M:%S", minsec="%H:%M:%S", minutes="%H:%M",
            hourmin="%H:%M", hours="%H:%M", days="%b %d", months="%b %Y", years="%Y", context=None,
        )
    return fig


def value_ticks() -> NumeralTickFormatter:
    """Short numbers (6.7m, 12.5k): a Bokeh model belongs to one page, so one per figure."""
    return NumeralTickFormatter(format="0.[00]a")
