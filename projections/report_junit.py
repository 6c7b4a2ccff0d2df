"""A run's report as JUnit XML, the format every CI system reads (valid against Jenkins' junit-10.xsd
but for the file= and line= a failed testcase carries, which tests/test_report.py checks).

One <testsuite> per task (named after it, its worker as hostname, its metrics as properties), one
<testcase> per test of the task's last attempt, with <failure>, <error> or <skipped>. A failed test's
case is what pytest's own junitxml writes: its classname, the crash message as message=, the
exception type as type=, the full traceback as text, the captured output in <system-out> and
<system-err>, and its file= and line=. A task that
reported no tests (a command or benchmark task, or a test task that broke before its tests ran), or
that ended badly though none of its tests failed (a timeout), is a testcase of its own too
(`report.task_case`), so a run that went wrong never reads as a success.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime

from dtf.workers.nodeids import junit_names


_NOT_XML = re.compile("[^\t\n\r\u0020-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
"""Characters XML 1.0 cannot hold at all (not even escaped): ANSI colour codes in test output, say."""
MAX_MESSAGE = 64_000
"""Characters of one failure's text kept; the full log stays in the artifacts store (`dtf logs`)."""


def _text(value: object) -> str:
    return _NOT_XML.sub("\ufffd", str(value))


def _time(seconds: float | None) -> str:
    return f"{seconds or 0.0:.3f}"


def _timestamp(iso: str | None) -> str | None:
    """JUnit's timestamp: ISO 8601 without an offset (UTC)."""
    if not iso:
        return None
    return datetime.fromisoformat(iso).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


def _set(element: ET.Element, **attributes: object) -> None:
    for key, value in attributes.items():
        if value is not None:
            element.set(key, _text(value))


def _problem(case: ET.Element, tag: str, message: str, kind: str, text: str = "") -> None:
    """<failure>/<error>: `message` the crash message, `text` the whole traceback (else the message)."""
    node = ET.SubElement(case, tag)
    _set(node, message=(message.strip() or kind)[:1000], type=kind)
    node.text = _text((text or message)[-MAX_MESSAGE:])


_EXCEPTION = re.compile(r"([A-Za-z_][\w.]*)(?::|$)")


def exception_type(message: str, default: str) -> str:
    """The exception's type from pytest's crash message (`AssertionError: assert 1 == 2`)."""
    found = _EXCEPTION.match(message.strip())
    return found.group(1) if found else default


def _testcase(suite: ET.Element, test: dict, locations: bool) -> str:
    classname, name = junit_names(test["nodeid"])
    case = ET.SubElement(suite, "testcase")
    _set(case, classname=test.get("classname") or classname, name=name, time=_time(test["duration_s"]))
    if locations and test.get("file"):
        _set(case, file=test["file"], line=test.get("line"))
    outcome = test["outcome"]
    message = test["message"] or ""
    if outcome in ("failed", "error"):
        _problem(case, "failure" if outcome == "failed" else "error", message,
                 exception_type(message, outcome), test.get("longrepr") or "")
    elif outcome == "skipped":
        skipped = ET.SubElement(case, "skipped")
        _set(skipped, message=(message or "skipped")[:1000])
    for tag, key in (("system-out", "stdout"), ("system-err", "stderr")):
        if test.get(key):
            ET.SubElement(case, tag).text = _text(test[key])
    return outcome


def _task_case(suite: ET.Element, task: dict, outcome: str) -> str:
    case = ET.SubElement(suite, "testcase")
    _set(case, classname=f"dtf.{task['type'] or 'task'}", name=task["name"] or task["task_id"],
         time=_time(task["duration_s"]))
    if outcome != "passed":
        _problem(case, "failure" if outcome == "failed" else "error",
                 task["reason"] or f"task {task['state']}", task["state"])
    return outcome


def _metrics_for(doc: dict, task: dict) -> list[dict]:
    return [m for m in doc["metrics"] if m.get("benchmark") in (task["name"], task["task_id"])]


def to_junit(doc: dict, locations: bool = True) -> bytes:
    """The report as JUnit XML. `locations` puts a failed test's `file` and `line` on its testcase,
    as pytest's xunit1 family does and GitLab and the GitHub JUnit actions read; junit-10.xsd does not
    declare them (pytest's default xunit2 leaves them out for that reason)."""
    root = ET.Element("testsuites")
    totals = {"tests": 0, "failures": 0, "errors": 0}
    for task in doc["tasks"]:
        suite = ET.SubElement(root, "testsuite")
        properties = ET.SubElement(suite, "properties")
        for key, value in (("dtf.task_id", task["task_id"]), ("dtf.run_id", doc["run_id"]),
                           ("dtf.type", task["type"]), ("dtf.state", task["state"]),
                           ("dtf.attempts", task["attempts"])):
            _set(ET.SubElement(properties, "property"), name=key, value=value if value is not None else "")
        for metric in _metrics_for(doc, task):
            _set(ET.SubElement(properties, "property"), name=f"metric.{metric['series']}",
                 value=metric["mean"])
        outcomes = [_testcase(suite, test, locations) for test in task["tests"]]
        if task["task_case"] is not None:
            outcomes.append(_task_case(suite, task, task["task_case"]))
        counts = {"tests": len(outcomes), "failures": outcomes.count("failed"),
                  "errors": outcomes.count("error")}
        _set(suite, name=task["name"] or task["task_id"], **counts, skipped=outcomes.count("skipped"),
             time=_time(task["duration_s"]), timestamp=_timestamp(task.get("finished_at")),
             hostname=task["worker_id"], id=task["task_id"])
        for key in totals:
            totals[key] += counts[key]
    _set(root, name=f"dtf run {doc['run_id']}", **totals, time=_time(doc["summary"]["duration_s"]))
    ET.indent(root)
    return ET.tostring(root, encoding="utf-8", xml_declaration=True) + b"\n"
