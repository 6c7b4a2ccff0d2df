"""A run's report as one self-contained HTML page: styles inline, charts as inline SVG, no script and
nothing fetched, so it can be attached to a CI run and opened anywhere, offline.

Charts: the run's test outcomes as one stacked bar, the slowest tests as horizontal bars, and each
benchmark series' value. Every text from the run is escaped.
"""

from __future__ import annotations

from html import escape

from dtf.projections.report import broken_tasks, regressions

COLOURS = {"passed": "#2da44e", "failed": "#cf222e", "errors": "#bf8700", "skipped": "#8c959f"}
SLOWEST = 15
BAR_W = 640

_STYLE = """
body{font:14px/1.45 system-ui,sans-serif;margin:2rem auto;max-width:64rem;color:#1f2328;padding:0 1rem}
h1{font-size:1.4rem}h2{font-size:1.1rem;margin-top:2rem}
table{border-collapse:collapse;width:100%}td,th{border:1px solid #d0d7de;padding:.25rem .5rem;text-align:left}
th{background:#f6f8fa}.passed{color:#1a7f37}.failed,.error{color:#cf222e}
pre{background:#f6f8fa;padding:.5rem;overflow:auto;max-height:20rem;font-size:12px}
svg text{font:12px system-ui,sans-serif}
"""


def _outcome_bar(summary: dict) -> str:
    total = sum(summary[k] for k in COLOURS) or 1
    x = 0.0
    parts = []
    for key, colour in COLOURS.items():
        width = BAR_W * summary[key] / total
        if width:
            parts.append(f'<rect x="{x:.1f}" y="0" width="{width:.1f}" height="24" fill="{colour}">'
                         f"<title>{key}: {summary[key]}</title></rect>")
        x += width
    legend = "".join(
        f'<rect x="{i * 110}" y="32" width="10" height="10" fill="{c}"/>'
        f'<text x="{i * 110 + 14}" y="41">{k} {summary[k]}</text>'
        for i, (k, c) in enumerate(COLOURS.items())
    )
    return (f'<svg role="img" aria-label="test outcomes" width="{BAR_W}" height="48" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(parts)}{legend}</svg>')


def _bars(items: list[tuple[str, float]], unit: str) -> str:
    """Horizontal bars, one per (label, value), scaled to the largest value."""
    if not items:
        return ""
    top = max(abs(v) for _, v in items) or 1.0
    row, label_w = 20, 300
    body = []
    for i, (label, value) in enumerate(items):
        width = (BAR_W - label_w - 80) * abs(value) / top
        y = i * row
        body.append(
            f'<text x="{label_w - 6}" y="{y + 14}" text-anchor="end">{escape(label[-48:])}</text>'
            f'<rect x="{label_w}" y="{y + 3}" width="{width:.1f}" height="{row - 6}" fill="#0969da">'
            f"<title>{escape(label)}: {value:.4g}{unit}</title></rect>"
            f'<text x="{label_w + width + 4:.1f}" y="{y + 14}">{value:.4g}{unit}</text>'
        )
    return (f'<svg role="img" width="{BAR_W}" height="{row * len(items)}" '
            f'xmlns="http://www.w3.org/2000/svg">{"".join(body)}</svg>')


def _cell(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def to_html(doc: dict) -> str:
    s = doc["summary"]
    verdict = "passed" if doc["ok"] else "did not pass"
    out = [
        "<!doctype html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>dtf run {escape(doc['run_id'])}</title><style>{_STYLE}</style></head><body>",
        f'<h1>dtf run <code>{escape(doc["run_id"])}</code> '
        f'<span class="{"passed" if doc["ok"] else "failed"}">{verdict}</span></h1>',
        f"<p>{s['tasks']} tasks, {s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped, "
        f"{s['errors']} errors; {s['duration_s']:.1f} s of task time.</p>",
        _outcome_bar(s),
    ]
    found = regressions(doc)
    if found:
        out.append(f"<h2>{len(found)} regression(s)</h2><table><tr><th>series</th><th>details</th></tr>")
        out += [f"<tr><td><code>{escape(str(a.get('series')))}</code></td><td>"
                + escape(", ".join(f"{k}={v}" for k, v in a.items() if k not in ("kind", "series")))
                + "</td></tr>" for a in found]
        out.append("</table>")
    out.append("<h2>Tasks</h2><table><tr><th>task</th><th>type</th><th>state</th><th>worker</th>"
               "<th>attempts</th><th>duration</th><th>passed</th><th>failed</th><th>skipped</th>"
               "<th>errors</th></tr>")
    for task in doc["tasks"]:
        c = task["counts"]
        out.append(
            f"<tr><td>{_cell(task['name'] or task['task_id'])}</td><td>{_cell(task['type'])}</td>"
            f'<td class="{escape(task["state"])}">{_cell(task["state"])}</td>'
            f'<td>{_cell(task["worker_id"])}</td>'
            f"<td>{task['attempts']}</td><td>{_cell(task['duration_s'])}</td>"
            + "".join(f"<td>{c[k]}</td>" for k in ("passed", "failed", "skipped", "errors")) + "</tr>"
        )
    out.append("</table>")
    problems = [t for task in doc["tasks"] for t in task["tests"] if t["outcome"] in ("failed", "error")]
    broken = broken_tasks(doc)
    if problems or broken:
        out.append("<h2>Failures</h2>")
        out += [f"<p><b>{_cell(task['name'] or task['task_id'])}</b> {_cell(task['state'])}: "
                f"{_cell(task['reason'] or None)}</p>" for task in broken]
        out += [f'<details><summary><code>{escape(t["nodeid"])}</code> <span class="{t["outcome"]}">'
                f'{t["outcome"]}</span></summary><pre>{escape(t["message"] or "")}</pre></details>'
                for t in problems]
    tests = sorted((t for task in doc["tasks"] for t in task["tests"]), key=lambda t: -(t["duration_s"] or 0))
    if tests:
        slowest = [(t["nodeid"], t["duration_s"] or 0.0) for t in tests[:SLOWEST]]
        out.append(f"<h2>Slowest tests</h2>{_bars(slowest, ' s')}")
    if doc["metrics"]:
        out.append("<h2>Benchmarks</h2>")
        out.append(_bars([(m["series"], m["mean"]) for m in doc["metrics"] if m["mean"] is not None], ""))
        out.append("<table><tr><th>series</th><th>value</th><th>runs</th></tr>")
        out += [f"<tr><td><code>{escape(m['series'])}</code></td><td>{_cell(m['mean'])}</td>"
                f"<td>{m['count']}</td></tr>" for m in doc["metrics"]]
        out.append("</table>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"
