"""A pytest plugin that records one JSON line per test for the worker (`-p dtf.workers.pytest_plugin`).

It writes to the file named by the environment variable DTF_TEST_REPORT (nothing when unset):

    {"nodeid": "...", "outcome": "passed|failed|skipped|error", "duration_s": 0.01, "message": "..."}

A failed or errored test's line also carries where and why, for CI: `longrepr` (the traceback as
pytest prints it), `short` (the same in `--tb=short` style), `file` and `line` (the crash's place
when it is in the suite, else the test's own), `classname` (as pytest's junitxml makes it from the
node id) and the captured `stdout` / `stderr`, each capped (`cap`). DTF_SOURCE_PREFIX, when set,
is where pytest's rootdir sits in the submitter's tree (`tests` for `dtf submit tests/` run from a
repository's root): it goes before `file` and the classname's module path, so both read as they
would from the submitter's own `pytest --junitxml` there.

A test's phases fold into one outcome: a failing setup or teardown is "error" (a failing call stays
"failed"), a skip at setup or in the call is "skipped", xfail counts as skipped and a (non-strict)
xpass as passed; a strict xpass is reported by pytest as a failure. Collection errors get a line of
their own with outcome "error". Under pytest-xdist only the controller writes, so nothing is doubled.
Only pytest, the standard library and `dtf.workers.nodeids` (itself standard library only) are
imported: the plugin loads in whatever Python runs the tests. In a task's own environment (no dtf
installed) workers/pyenv.py puts a copy of this file on PYTHONPATH as `dtf_report_plugin`, and of
nodeids as `dtf_nodeids`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import pytest

try:
    from dtf.workers.nodeids import classname
except ImportError:  # loaded standalone as dtf_report_plugin in a task's own environment (workers/pyenv.py)
    from dtf_nodeids import classname  # type: ignore[no-redef]

REPORT_ENV = "DTF_TEST_REPORT"
PREFIX_ENV = "DTF_SOURCE_PREFIX"
MAX_MESSAGE = 500
MAX_LONGREPR = 64 * 1024
MAX_SHORT = 8 * 1024
MAX_OUTPUT = 16 * 1024
"""Characters kept of a traceback, of its short form and of each captured stream: a result event
stays small enough to inline (bigger test lists go to the artifacts store) and a runaway test's
output cannot bloat the read model. The full log is in the artifacts store (`dtf logs`)."""


def cap(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters, keeping its head and tail (a traceback's end says
    what broke), with a marker saying how much went."""
    if len(text) <= limit:
        return text
    marker = "\n... [{} characters cut by dtf] ...\n"
    keep = limit - len(marker.format(len(text))) - 16
    head = keep // 2
    return text[:head] + marker.format(len(text) - keep) + text[len(text) - (keep - head):]


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

    def __init__(self, path: str, rootdir: str = "", prefix: str = "") -> None:
        self.path = path
        self.rootdir = rootdir
        self.prefix = prefix.strip("/")
        self.tests: dict[str, dict[str, Any]] = {}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item: Any, call: Any) -> Any:
        """Render a failing phase's traceback once more in short style while the exception is at
        hand (the report keeps only the long form)."""
        outcome = yield
        report = outcome.get_result()
        if report.failed and call.excinfo is not None:
            try:
                report.dtf_short = str(item._repr_failure_py(call.excinfo, style="short"))
            except Exception:  # noqa: BLE001 - a private pytest API: the crash message will do
                pass

    def _place(self, report: Any) -> tuple[str, int | None]:
        """Where it broke, relative to the rootdir: the crash's file and line when that is inside
        the suite, else the test's own location (pytest's is 0-based; ours, as an editor's, 1-based)."""
        crash = getattr(report.longrepr, "reprcrash", None)
        where, line = "", None
        if crash is not None and getattr(crash, "path", "") and self.rootdir:
            relative = os.path.relpath(crash.path, self.rootdir)
            if not relative.startswith(".."):
                where, line = relative.replace(os.sep, "/"), crash.lineno
        if not where and report.location:
            where, lineno = str(report.location[0]).replace(os.sep, "/"), report.location[1]
            line = lineno + 1 if lineno is not None else None
        return (f"{self.prefix}/{where}" if self.prefix and where else where), line

    def _failure(self, state: dict[str, Any], report: Any) -> None:
        """The first failing phase's traceback and place (a teardown error after a failed call
        adds its traceback to the call's)."""
        longrepr = report.longreprtext or ""
        if "longrepr" in state:
            state["longrepr"] = cap(f"{state['longrepr']}\n\n{report.when}: {longrepr}", MAX_LONGREPR)
            return
        state["longrepr"] = cap(longrepr, MAX_LONGREPR)
        state["short"] = cap(getattr(report, "dtf_short", "") or _message(report), MAX_SHORT)
        state["file"], line = self._place(report)
        if line is not None:
            state["line"] = line

    def _write(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")

    def pytest_runtest_logreport(self, report: Any) -> None:
        state = self.tests.setdefault(
            report.nodeid, {"nodeid": report.nodeid, "outcome": None, "duration_s": 0.0, "message": ""}
        )
        state["duration_s"] += float(getattr(report, "duration", 0.0) or 0.0)
        outcome = state["outcome"]
        if report.failed:
            self._failure(state, report)
        # Each phase's report holds the output captured so far, so the last one has all of it.
        state["stdout"], state["stderr"] = report.capstdout, report.capstderr
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
        stdout, stderr = state.pop("stdout"), state.pop("stderr")
        if state["outcome"] in ("failed", "error"):
            state["classname"] = classname(nodeid, self.prefix)
            for key, text in (("stdout", stdout), ("stderr", stderr)):
                if text:
                    state[key] = cap(text, MAX_OUTPUT)
        else:  # an xfail's traceback is expected, not news
            for key in ("longrepr", "short", "file", "line"):
                state.pop(key, None)
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
    recorder = Recorder(path, str(config.rootpath), os.environ.get(PREFIX_ENV, ""))
    config.pluginmanager.register(recorder, "dtf-test-report")
