"""A run's report for CI: one document built from the read model's answers, written as JSON or Markdown
here, as JUnit XML by `report_junit` and as a self-contained HTML page by `report_html`.

    runs {"offset"?, "limit"?} -> {"runs": [{run_id, submitted_at, finished_at, tasks, states, tests}],
                                   "next_offset"}   newest first (the `runs` query; a submitter's own)

`document(run_id, tasks, results, metrics, anomalies)` is pure: it takes the rows of the `tasks`,
`results` and `aggregate` queries and the `anomalies` reply, keeps each task's tests from its last
attempt, and counts the way `dtf submit --wait` does (a task that ended badly without reporting any
test counts as one error, so a report cannot look green when something broke).
"""

from __future__ import annotations

import html
import json
from collections import Counter
from typing import Annotated

import duckdb
import msgspec

from dtf.projections.aggregate import Query

OK_STATES = ("passed",)
FAILED_STATES = ("failed",)
"""A task in any other terminal state (error, timed_out, cancelled, rejected) ended as an error."""
COUNTS = ("passed", "failed", "skipped", "errors")
METRIC_GROUPS = ["benchmark", "metric", "labels", "hardware"]
"""How a report asks `aggregate` for a run's metrics: one row per series, as detection names them."""


class RunsRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A `queries.Page` (not a subclass: `queries` imports this module)."""

    submitter: str | None = None
    offset: Annotated[int, msgspec.Meta(ge=0)] = 0
    limit: Annotated[int, msgspec.Meta(ge=1)] | None = None


def runs(cur: duckdb.DuckDBPyConnection, request: RunsRequest) -> dict:
    from dtf.projections.queries import _page  # here, not at the top: queries imports this module

    sql = """
        SELECT run_id, min(submitted_at) AS submitted_at, max(finished_at) AS finished_at, count(*) AS tasks,
            list(status ORDER BY status) AS states, sum(passed) AS passed, sum(failed) AS failed,
            sum(skipped) AS skipped, sum(errors) AS errors
        FROM tasks WHERE $submitter IS NULL OR submitter = $submitter
        GROUP BY run_id ORDER BY submitted_at DESC NULLS LAST, run_id DESC
    """

    def item(r: tuple) -> dict:
        return {
            "run_id": r[0], "submitted_at": r[1].isoformat() if r[1] else None,
            "finished_at": r[2].isoformat() if r[2] else None, "tasks": r[3], "states": dict(Counter(r[4])),
            "tests": dict(zip(COUNTS, (int(n or 0) for n in r[5:9]))),
        }

    found, next_offset = _page(cur, sql, {"submitter": request.submitter}, request, item)
    return {"runs": found, "next_offset": next_offset}


QUERY: Query = (RunsRequest, runs)


def _last_attempt_tests(results: list[dict]) -> dict[str, list[dict]]:
    last: dict[str, int] = {}
    for row in results:
        last[row["task_id"]] = max(last.get(row["task_id"], 0), row["attempt"])
    tests: dict[str, list[dict]] = {}
    for row in results:
        if row["attempt"] == last[row["task_id"]]:
            tests.setdefault(row["task_id"], []).append(row)
    return tests


def test_counts(tests: list[dict]) -> dict[str, int]:
    counts = Counter("errors" if t["outcome"] == "error" else t["outcome"] for t in tests)
    return {key: counts.get(key, 0) for key in COUNTS}


def task_outcome(task: dict) -> str:
    """passed, failed or error: how a task without tests of its own counts."""
    if task["state"] in OK_STATES:
        return "passed"
    return "failed" if task["state"] in FAILED_STATES else "error"


UNSETTLED = ("pending", "assigned", "running", "unschedulable")


def task_case(task: dict, tests: list[dict]) -> str | None:
    """The outcome of the task as a case of its own, when its tests do not tell it: a task without
    tests, or one that ended badly although none of its tests failed (it timed out, or pytest failed
    the session). None for a task still going or whose tests say it all."""
    if task["state"] in UNSETTLED:
        return None
    outcome = task_outcome(task)
    if not tests or (outcome != "passed" and not any(t["outcome"] in ("failed", "error") for t in tests)):
        return outcome
    return None


def document(run_id: str, tasks: list[dict], results: list[dict], metrics: list[dict],
             anomalies: list[dict] | None) -> dict:
    """The report of one run. `anomalies` None means detection did not answer: unknown, not none.
    Each task gets its last attempt's `tests`, their `counts` and its `task_case` (see there)."""
    by_task = _last_attempt_tests(results)
    entries = []
    totals = dict.fromkeys(COUNTS, 0)
    for task in tasks:
        tests = sorted(by_task.get(task["task_id"], []), key=lambda t: t["nodeid"])
        counts = test_counts(tests)
        own = task_case(task, tests)
        if own is not None:
            counts["errors" if own == "error" else own] += 1
        for key in COUNTS:
            totals[key] += counts[key]
        entries.append({**task, "tests": tests, "counts": counts, "task_case": own})
    states = Counter(task["state"] for task in tasks)
    regressions = [a for a in anomalies or [] if a.get("kind") == "regression"]
    return {
        "run_id": run_id,
        "ok": bool(tasks) and all(task["state"] in OK_STATES for task in tasks),
        "summary": {"tasks": len(tasks), "states": dict(sorted(states.items())), **totals,
                    "duration_s": sum(task["duration_s"] or 0.0 for task in tasks),
                    "regressions": len(regressions) if anomalies is not None else None},
        "tasks": entries,
        "metrics": metrics,
        "anomalies": anomalies,
    }


def broken_tasks(doc: dict) -> list[dict]:
    """Tasks that went wrong in a way no test of theirs shows."""
    return [task for task in doc["tasks"] if task["task_case"] not in (None, "passed")]


def regressions(doc: dict) -> list[dict]:
    return [a for a in doc["anomalies"] or [] if a.get("kind") == "regression"]


def to_json(doc: dict) -> str:
    return json.dumps(doc, indent=2, sort_keys=True)


# --- Markdown (GitHub step summaries) ---------------------------------------------------------------

MAX_FAILURES = 50
"""Failures listed in full in Markdown; GitHub caps a step summary at 1 MiB."""
_MESSAGE_LINES = 30


def _md(text: object) -> str:
    """A table cell: one line, pipes escaped."""
    return str(text if text is not None else "-").replace("|", "\\|").replace("\n", " ")


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _change(value: float | None) -> str:
    return "-" if value is None else f"{value:+.1%}"


def to_markdown(doc: dict) -> str:
    s = doc["summary"]
    verdict = "passed" if doc["ok"] else "did not pass"
    icon = ":white_check_mark:" if doc["ok"] else ":x:"
    lines = [
        f"## {icon} dtf run `{doc['run_id']}` {verdict}", "",
        "| tasks | passed | failed | skipped | errors | task time |", "|---|---|---|---|---|---|",
        f"| {s['tasks']} | {s['passed']} | {s['failed']} | {s['skipped']} | {s['errors']} "
        f"| {s['duration_s']:.1f}s |",
        "",
    ]
    if s["regressions"]:
        lines += [f"**{s['regressions']} regression(s)**", "", "| series | kind | details |", "|---|---|---|"]
        lines += [f"| `{_md(a.get('series'))}` | {_md(a.get('kind'))} | {_md(_anomaly_details(a))} |"
                  for a in regressions(doc)]
        lines.append("")
    lines += ["| task | type | state | worker | attempts | passed | failed | skipped | errors |",
              "|---|---|---|---|---|---|---|---|---|"]
    for task in doc["tasks"]:
        c = task["counts"]
        lines.append(f"| {_md(task['name'] or task['task_id'])} | {_md(task['type'])} | {_md(task['state'])} "
                     f"| {_md(task['worker_id'])} | {task['attempts']} | {c['passed']} | {c['failed']} "
                     f"| {c['skipped']} | {c['errors']} |")
    lines.append("")
    failures = [t for task in doc["tasks"] for t in task["tests"] if t["outcome"] in ("failed", "error")]
    broken = broken_tasks(doc)
    if failures or broken:
        lines += ["### Failures", ""]
        for task in broken:
            name = _md(task["name"] or task["task_id"])
            lines.append(f"- **{name}** {task['state']}: {_md(task['reason'] or None)}")
        for test in failures[:MAX_FAILURES]:
            text = test.get("short") or test["message"] or ""
            message = "\n".join(text.splitlines()[-_MESSAGE_LINES:]).replace("```", "'''")
            place = (test.get("file") or "") + (f":{test['line']}" if test.get("file") and test.get("line") else "")
            where = f" at <code>{html.escape(place)}</code>" if place else ""
            lines += [f"<details><summary><code>{html.escape(test['nodeid'])}</code> {test['outcome']}{where}"
                      "</summary>", "", "```", message, "```", "</details>", ""]
        if len(failures) > MAX_FAILURES:
            lines.append(f"... and {len(failures) - MAX_FAILURES} more")
        lines.append("")
    if doc["metrics"]:
        lines += ["### Benchmarks", "", "| series | value | runs |", "|---|---|---|"]
        lines += [f"| `{_md(m['series'])}` | {_number(m['mean'])} | {m['count']} |" for m in doc["metrics"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def _anomaly_details(anomaly: dict) -> str:
    return ", ".join(f"{k}={v}" for k, v in anomaly.items() if k not in ("kind", "series", "run_id")
                     and isinstance(v, (str, int, float)))

