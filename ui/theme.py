"""Light and dark: one palette per theme for the HTML views and the Bokeh charts.

Panel's template toggles the theme (it reloads the page with ?theme=dark); each session reads it
once and styles its own panes, so two tabs may use different themes.
"""

from __future__ import annotations

PALETTES = {
    "default": {"fg": "#1f2933", "muted": "#616e7c", "bg": "#ffffff", "line": "#e4e7eb", "head": "#f5f7fa"},
    "dark": {"fg": "#e4e7eb", "muted": "#9aa5b1", "bg": "#1f2933", "line": "#3e4c59", "head": "#323f4b"},
}
STATUS_COLORS = {
    "passed": "#2f9e44", "online": "#2f9e44", "failed": "#e03131", "error": "#c2255c", "lost": "#c2255c",
    "timed_out": "#d9480f", "running": "#1c7ed6", "assigned": "#4dabf7", "pending": "#868e96",
    "unschedulable": "#f08c00", "quarantined": "#f08c00", "warning": "#f08c00", "cancelled": "#adb5bd",
    "released": "#adb5bd", "rejected": "#e8590c", "left": "#adb5bd", "regression": "#f08c00",
    "deadline": "#f08c00",
}


def theme_of(session_args: dict) -> str:
    """The session's theme from the page URL (?theme=dark), as Panel's templates set it."""
    values = session_args.get("theme") or [b"default"]
    return "dark" if values[0] in (b"dark", "dark") else "default"


def css(theme: str) -> str:
    p = PALETTES[theme]
    badges = "\n".join(f".s-{name} {{ --c: {color}; }}" for name, color in STATUS_COLORS.items())
    return f"""
:host {{ color: {p['fg']}; font-size: 13px; width: 100%; }}
.dtf-table {{ border-collapse: collapse; width: 100%; }}
.dtf-table th {{ text-align: left; background: {p['head']}; color: {p['muted']}; font-weight: 600;
  padding: 4px 8px; border-bottom: 1px solid {p['line']}; position: sticky; top: 0; }}
.dtf-table td {{ padding: 3px 8px; border-bottom: 1px solid {p['line']}; vertical-align: top; }}
.dtf-empty {{ color: {p['muted']}; padding: 6px 2px; font-style: italic; }}
.badge {{ display: inline-block; padding: 0 7px; border-radius: 9px; color: #fff;
  background: var(--c, #868e96); font-size: 12px; white-space: nowrap; }}
.dtf-tiles {{ display: flex; gap: 12px; flex-wrap: wrap; }}
.tile {{ border-left: 4px solid var(--c, {p['line']}); background: {p['head']}; padding: 6px 14px;
  min-width: 110px; border-radius: 4px; }}
.tile .value {{ font-size: 22px; font-weight: 600; }}
.tile .label {{ color: {p['muted']}; font-size: 12px; }}
.dtf-pre {{ background: {p['head']}; color: {p['fg']}; padding: 8px; max-height: 320px; overflow: auto;
  white-space: pre-wrap; font-size: 12px; border-radius: 4px; margin: 0; }}
h4 {{ font-size: 15px; margin: 14px 0 6px; color: {p['fg']}; }}
.muted {{ color: {p['muted']}; }}
{badges}
"""
