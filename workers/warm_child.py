"""The run loop inside a warm pytest process (`-p dtf.workers.warm_child`; see `warm` for the parent).

pytest has no "serve node ids on demand" mode, so, like pytest-xdist's worker, this plugin takes over
`pytest_runtestloop`: pytest starts and collects the files it was given (the first shard's) as usual,
then instead of running every item the loop answers requests read from a pipe the parent passed (its
fd number in DTF_WARM_REQUEST_FD; not stdin, which pytest's capture keeps on /dev/null), one JSON
line each. A request naming files not collected yet collects them first, into the same session
(`Session.perform_collect`), so each process imports only the test modules of the shards it serves,
where every pytest-xdist worker collects, and so imports, the whole suite:

    {"nodeids": [...], "report": "<path>"}   run these items (ids relative to the working directory,
                                             as `dtf submit --split` collected them, or whole files
                                             when it split by file), in this order,
                                             through the normal `pytest_runtest_protocol`; the dtf
                                             report plugin writes their outcomes to "report"

After collection, and after each request, it writes one reply line to stdout, in the same stream as
the tests' output, so everything a shard printed comes before its reply:

    <token> {"ready": true, "items": n}      collected, waiting (false: collection failed)
    <token> {"exitstatus": 0|1, "missing": [...]}   a request is done (missing: ids not collected;
                                             nothing ran; with "collection_errors": n when
                                             collecting its files failed)

`<token>` comes from the environment (DTF_WARM_TOKEN), so a test cannot forge a reply by printing.
Each request starts with fresh failure counters (`-x`/`--maxfail` count per request) and ends with
the last item's teardown against no next item, so every fixture, session-scoped ones too, is torn
down before the reply: a shard's fixture errors land in its own report, and a killed process leaves
nothing half set up for the next shard. The loop ends at end of input, or after DTF_WARM_IDLE_S
seconds without a request (so a process whose parent vanished goes away by itself).
"""

from __future__ import annotations

import json
import os
import select
import sys
import time
from typing import Any

import pytest

TOKEN_ENV = "DTF_WARM_TOKEN"
REQUEST_FD_ENV = "DTF_WARM_REQUEST_FD"
IDLE_ENV = "DTF_WARM_IDLE_S"


def file_of(arg: str) -> str:
    """The path part of a node id or test argument, normalized (`./a/b.py::t` -> `a/b.py`)."""
    return os.path.normpath(arg.partition("::")[0])


def runnable_id(item: Any, cwd: str) -> str:
    """The item's node id relative to the working directory (pytest's own is relative to its rootdir)."""
    path = os.path.relpath(str(item.path), cwd)
    _, sep, rest = item.nodeid.partition("::")
    return path + sep + rest


class Lines:
    """Request lines from a file descriptor, with an idle timeout (select needs an unbuffered fd)."""

    def __init__(self, fd: int, idle_s: float) -> None:
        self.fd = fd
        self.idle_s = idle_s
        self.buffer = b""

    def next(self) -> dict | None:
        while b"\n" not in self.buffer:
            ready, _, _ = select.select([self.fd], [], [], self.idle_s)
            if not ready:
                return None
            chunk = os.read(self.fd, 65536)
            if not chunk:
                return None
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return json.loads(line)


class WarmLoop:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.token = os.environ[TOKEN_ENV]
        self.requests = Lines(int(os.environ[REQUEST_FD_ENV]), float(os.environ.get(IDLE_ENV, "60")))
        self.cwd = ""
        self.items: dict[str, Any] = {}
        """Collected so far, by node id relative to the working directory."""
        self.collected: set[str] = set()
        """The files (or directories) collection has been asked for."""
        self.not_found: set[str] = set()
        self.by_file: dict[str, list[Any]] = {}
        """Collected items by file, in collection order."""
        self.failures: list[pytest.TestReport] = []
        self.counts: dict[str, int] = {}

    def reply(self, message: dict) -> None:
        sys.stderr.flush()
        sys.stdout.flush()
        os.write(1, f"\n{self.token} {json.dumps(message)}\n".encode())

    @pytest.hookimpl(tryfirst=True)
    def pytest_runtestloop(self, session: pytest.Session) -> bool:
        if session.testsfailed and not session.config.option.continue_on_collection_errors:
            self.reply({"ready": False, "collection_errors": session.testsfailed})
            return True
        self.cwd = str(session.config.invocation_params.dir)
        self.add(session.items)
        self.collected = {file_of(arg) for arg in session.config.args}
        self.reply({"ready": True, "items": len(self.items)})
        while (request := self.requests.next()) is not None:
            self.serve(session, request)
        return True

    def add(self, items: list[Any]) -> None:
        for item in items:
            nodeid = runnable_id(item, self.cwd)
            self.items[nodeid] = item
            self.by_file.setdefault(file_of(nodeid), []).append(item)

    def collect_more(self, session: pytest.Session, nodeids: list[str]) -> int:
        """Collect the files of `nodeids` not collected yet; the number of collection errors."""
        files = sorted({file_of(n) for n in nodeids} - self.collected)
        if not files:
            return 0
        self.collected.update(files)
        failed_before = session.testsfailed
        try:
            new = session.perform_collect(files)
        except pytest.UsageError:  # "not found": the ids are then reported missing
            self.not_found.update(files)
            return 0
        self.add(new)
        return session.testsfailed - failed_before

    def chosen(self, nodeids: list[str]) -> tuple[list[Any], list[str]]:
        """The items a request names, in its order, and the ids it names that are not here. An id
        without `::` that is not an item is a whole file (a shard of `--split` by file): its items,
        none if it has none (every test skipped at module level, say)."""
        chosen: list[Any] = []
        missing: list[str] = []
        for nodeid in nodeids:
            file = file_of(nodeid)
            if nodeid in self.items:
                chosen.append(self.items[nodeid])
            elif "::" not in nodeid and file in self.collected and file not in self.not_found:
                chosen.extend(self.by_file.get(file, []))
            else:
                missing.append(nodeid)
        return chosen, missing

    def serve(self, session: pytest.Session, request: dict) -> None:
        chosen, missing = self.chosen(request["nodeids"])
        errors = self.collect_more(session, missing) if missing else 0
        if missing:
            chosen, missing = self.chosen(request["nodeids"])
        if missing or errors:
            self.reply({"exitstatus": None, "missing": missing[:20], "collection_errors": errors})
            return
        recorder = self.config.pluginmanager.get_plugin("dtf-test-report")
        if recorder is not None:
            recorder.path = request["report"]
        session.testsfailed = 0
        session.shouldfail = session.shouldstop = False
        self.failures, self.counts = [], {}
        started = time.monotonic()
        for i, item in enumerate(chosen):
            nextitem = chosen[i + 1] if i + 1 < len(chosen) else None
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
            if session.shouldfail or session.shouldstop:  # -x: the protocol already tore everything down
                break
        self.summarize(time.monotonic() - started)
        self.reply({"exitstatus": 1 if session.testsfailed else 0, "missing": []})

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when == "call" or report.failed or (report.when == "setup" and report.skipped):
            if report.failed and report.when != "call":
                word = "error"
            elif hasattr(report, "wasxfail"):
                word = "xfailed" if report.skipped else "xpassed"
            else:
                word = report.outcome
            self.counts[word] = self.counts.get(word, 0) + 1
        if report.failed:
            self.failures.append(report)

    def summarize(self, seconds: float) -> None:
        """What `pytest -q` prints at the end, for this request: each failure, then the counts."""
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is None:
            return
        reporter.ensure_newline()
        for report in self.failures:
            title = report.head_line or report.nodeid
            reporter.write_sep("_", f"ERROR at {report.when} of {title}" if report.when != "call" else title,
                               red=True, bold=True)
            report.toterminal(reporter._tw)
            for name, content in report.sections:
                reporter.write_sep("-", name)
                reporter.write_line(content.rstrip("\n"))
        counts = ", ".join(f"{n} {word}" for word, n in sorted(self.counts.items())) or "no tests ran"
        reporter.write_line(f"{counts} in {seconds:.2f}s")


def pytest_configure(config: pytest.Config) -> None:
    if REQUEST_FD_ENV in os.environ and not hasattr(config, "workerinput"):
        config.pluginmanager.register(WarmLoop(config), "dtf-warm-loop")
