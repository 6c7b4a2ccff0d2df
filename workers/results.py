"""Reading what a finished task left behind: the plugin's per-test JSON lines and a benchmark's metrics.

Both are blocking file reads; the runner calls them through `asyncio.to_thread`.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import stat
from pathlib import Path

import msgspec

from dtf.events import TestCounts, TestOutcome

log = logging.getLogger("dtf.worker.results")

_outcome_decoder = msgspec.json.Decoder(TestOutcome)


class MetricsError(ValueError):
    """The metrics file is missing or is not a JSON object of finite numbers; the message says which."""


class NotOwnFile(OSError):
    """What the task left under the name is a symlink, a hard link or not a regular file."""


def read_own(path: Path) -> bytes:
    """A file the task wrote into its attempt dir, and not what a link there points at. The task may
    run as another uid than a root worker and owns that directory: a symlink or hard link named like
    the report would make the worker read, and publish as results, any file root can read (another
    tenant's report, a creds file). Raises FileNotFoundError when absent, NotOwnFile for a link."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NotOwnFile(f"{path.name} is a symlink") from None
        raise
    with os.fdopen(fd, "rb") as handle:
        info = os.fstat(handle.fileno())
        if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
            raise NotOwnFile(f"{path.name} is not a regular file of its own (a link, a fifo or a device)")
        return handle.read()


def read_test_report(path: Path) -> list[TestOutcome]:
    """Every well-formed line of a DTF_TEST_REPORT file (a missing file is no tests; a bad line is
    skipped with a warning: a test's own output cannot corrupt the others; a link is no tests)."""
    try:
        text = read_own(path)
    except FileNotFoundError:
        return []
    except NotOwnFile as exc:
        log.warning("not reading the test report: %s", exc)
        return []
    tests = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            tests.append(_outcome_decoder.decode(line))
        except (msgspec.DecodeError, RecursionError) as exc:
            log.warning("%s:%d: not a test outcome: %s", path, number, exc)
    return tests


def count(tests: list[TestOutcome]) -> TestCounts:
    counts = TestCounts()
    for test in tests:
        if test.outcome == "passed":
            counts.passed += 1
        elif test.outcome == "failed":
            counts.failed += 1
        elif test.outcome == "skipped":
            counts.skipped += 1
        else:
            counts.errors += 1
    return counts


def read_metrics(path: Path) -> dict[str, float]:
    """A benchmark's metrics: a JSON object whose values are all finite numbers (booleans are not)."""
    try:
        raw = json.loads(read_own(path))
    except FileNotFoundError:
        raise MetricsError(f"the benchmark wrote no metrics file ($DTF_METRICS = {path})") from None
    except NotOwnFile as exc:
        raise MetricsError(f"not reading the metrics file: {exc}") from None
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:  # RecursionError: absurd nesting
        raise MetricsError(f"the metrics file is not valid JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise MetricsError(f"the metrics file must hold a JSON object, not {type(raw).__name__}")
    bad = [
        key for key, value in raw.items()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value)
    ]
    if bad:
        raise MetricsError(f"metrics must be finite numbers; not numeric: {', '.join(sorted(bad)[:10])}")
    return {key: float(value) for key, value in raw.items()}
