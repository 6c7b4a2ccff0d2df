"""A run's report as JUnit XML, the format every CI system reads (valid against Jenkins' junit-10.xsd,
which tests/test_report.py checks).

One <testsuite> per task (named after it, its worker as hostname, its metrics as properties), one
<testcase> per test of the task's last attempt, with <failure>, <error> or <skipped>. A task that
reported no tests (a command or benchmark task, or a test task that broke before its tests ran), or
that ended badly though none of its tests failed (a timeout), is a testcase of its own too
(`report.task_case`), so a run that went wrong never reads as a success.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from datetime import UTC, datetime


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


def split_nodeid(nodeid: str) -> tuple[str, str]:
    """pytest's node id as JUnit's (classname, name), as pytest's own junitxml does:
    `tests/test_x.py::TestA::test_b[1]` -> (`tests.test_x.TestA`, `test_b[1]`)."""
    parts = nodeid.split("::")
    module = parts[0].removesuffix(".py").replace("/", ".").replace("\\", ".")
    if len(parts) == 1:
        return module, nodeid
    return ".".join([module, *parts[1:-1]]), parts[-1]


def _set(element: ET.Element, **attributes: object) -> None:
    for key, value in attributes.items():
        if value is not None:
            element.set(key, _text(value))


def _problem(case: ET.Element, tag: str, message: str, kind: str) -> None:
    first = message.strip().splitlines()[-1] if message.strip() else kind
    node = ET.SubElement(case, tag)
    _set(node, message=first[:1000], type=kind)
    node.text = _text(message[-MAX_MESSAGE:])


def _testcase(suite: ET.Element, test: dict) -> str:
    classname, name = split_nodeid(test["nodeid"])
    case = ET.SubElement(suite, "testcase")
    _set(case, classname=classname, name=name, time=_time(test["duration_s"]))
    outcome = test["outcome"]
    if outcome == "failed":
        _problem(case, "failure", test["message"] or "", "failed")
    elif outcome == "error":
        _problem(case, "error", test["message"] or "", "error")
    elif outcome == "skipped":
        skipped = ET.SubElement(case, "skipped")
        _set(skipped, message=(test["message"] or "skipped")[:1000])
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


def to_junit(doc: dict) -> bytes:
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
        outcomes = [_testcase(suite, test) for test in task["tests"]]
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
