"""Rows to HTML: one escaped table shape for every view, with state badges the theme colours."""

from __future__ import annotations

from html import escape

BADGE_COLUMNS = frozenset({"state", "outcome", "severity", "kind"})


def badge(value: str) -> str:
    token = value.split(" ")[0]
    return f'<span class="badge s-{escape(token)}">{escape(value)}</span>'


def table(rows: list[dict], view: str, key: str | None = None, empty: str = "nothing yet") -> str:
    """A table of `rows` (all with the same keys). `view` names it for tests and CSS; `key` names the
    column whose value marks each row (data-key), so a browser test can find a row by its id."""
    if not rows:
        return f'<div class="dtf-empty" data-view="{escape(view)}">{escape(empty)}</div>'
    columns = list(rows[0])
    head = "".join(f"<th>{escape(c)}</th>" for c in columns)
    body = []
    for row in rows:
        cells = "".join(
            f"<td>{badge(str(row[c])) if c in BADGE_COLUMNS else escape(str(row[c]))}</td>" for c in columns)
        mark = f' data-key="{escape(str(row[key]))}"' if key else ""
        body.append(f"<tr{mark}>{cells}</tr>")
    return (f'<table class="dtf-table" data-view="{escape(view)}"><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table>')


def tiles(items: list[tuple[str, object, str]]) -> str:
    """The summary strip: (label, value, state-class) tiles."""
    return '<div class="dtf-tiles">' + "".join(
        f'<div class="tile s-{escape(cls)}"><div class="value" data-tile="{escape(label)}">{escape(str(value))}'
        f'</div><div class="label">{escape(label)}</div></div>' for label, value, cls in items
    ) + "</div>"


def pre(text: str, view: str) -> str:
    return f'<pre class="dtf-pre" data-view="{escape(view)}">{escape(text)}</pre>'
