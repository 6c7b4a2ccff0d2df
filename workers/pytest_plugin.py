"""A pytest plugin that records one JSON line per test for the worker (`-p dtf.workers.pytest_plugin`).

It writes to the file named by the environment variable DTF_TEST_REPORT (nothing when unset):

    {"nodeid": "...", "outcome": "passed|failed|skipped|error", "duration_s": 0.01, "message": "..."}

A test's phases fold into one outcome: a failing setup or teardown is "error" (a failing call stays
"failed"), a skip at setup or in the call is "skipped", xfail counts as skipped and a (non-strict)
xpass as passed; a strict xpass is reported by pytest as a failure. Collection errors get a line of
their own with outcome "error". Under pytest-xdist only the controller writes, so nothing is doubled.
Only the standard library is imported: the plugin loads in whatever Python runs the tests.
"""

from __future__ import annotations

import json
import os
from typing import Any

REPORT_ENV = "DTF_TEST_REPORT"
MAX_MESSAGE = 500


def _message(report: Any) -> str:
    """A short, single-paragraph reason: the crash line, the skip reason or the xfail reason."""
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # skips: (path, lineno, reason)
        text = str(longrepr[2])
    else:
        crash = getattr(longrepr, "reprcrash", None)
        text = crash.message if crash is not None else (str(longrepr) if longrepr else "")
    text = text.strip()
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 1] + "…"


class Recorder:
    """Collects each test's phase reports and writes its line when the test finishes."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.tests: dict[str, dict[str, Any]] = {}

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def pytest_runtest_logreport(self, report: Any) -> None:
        state = self.tests.setdefault(
            report.nodeid, {"nodeid": report.nodeid, "outcome": None, "duration_s": 0.0, "message": ""}
        )
        state["duration_s"] += float(getattr(report, "duration", 0.0) or 0.0)
        outcome = state["outcome"]
        if report.when == "setup":
            if report.failed:
                outcome, state["message"] = "error", _message(report)
            elif report.skipped:
                outcome = "skipped"
                state["message"] = _xfail_message(report) or _message(report)
        elif report.when == "call":
            if hasattr(report, "wasxfail"):
                outcome = "skipped" if report.skipped else ("passed" if report.passed else "failed")
                state["message"] = _xfail_message(report)
            else:
                outcome = "passed" if report.passed else "failed" if report.failed else "skipped"
                if not report.passed:
                    state["message"] = _message(report)
        elif report.when == "teardown" and report.failed:
            if outcome != "failed":
                outcome = "error"
            reason = f"teardown: {_message(report)}"
            state["message"] = f"{state['message']}; {reason}" if state["message"] else reason
        state["outcome"] = outcome

    def pytest_runtest_logfinish(self, nodeid: str, location: Any) -> None:
        state = self.tests.pop(nodeid, None)
        if state is None or state["outcome"] is None:
            return
        state["duration_s"] = round(state["duration_s"], 6)
        state["message"] = state["message"][:MAX_MESSAGE]
        self._write(state)

    def pytest_collectreport(self, report: Any) -> None:
        if report.failed:
            self._write({
                "nodeid": report.nodeid or "<collection>", "outcome": "error", "duration_s": 0.0,
                "message": f"collection error: {_raised(report)}"[:MAX_MESSAGE],
            })


def _raised(report: Any) -> str:
    """The exception a collection error ends in (`E   SyntaxError: ...`), not the traceback above it."""
    raised = [line[1:].strip() for line in str(report.longrepr or "").splitlines() if line.startswith("E ")]
    return raised[-1] if raised else _message(report)


def _xfail_message(report: Any) -> str:
    reason = getattr(report, "wasxfail", None)
    if reason is None:
        return ""
    label = "xpass" if report.passed else "xfail"
    return f"{label}: {reason}" if reason else label


def pytest_configure(config: Any) -> None:
    path = os.environ.get(REPORT_ENV)
    if not path or hasattr(config, "workerinput"):  # xdist workers: the controller records
        return
    config.pluginmanager.register(Recorder(path), "dtf-test-report")
