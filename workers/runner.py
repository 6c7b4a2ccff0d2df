"""One attempt of one task: turn its spec into a command, run it, and say what happened.

    test       python -m pytest <paths> <pytest_args> -p dtf.workers.pytest_plugin -p no:cacheprovider -q
               exit 0 passed, 1 failed (error if no test was reported: pytest itself is missing),
               5 passed with no tests (nothing selected: `-k`, or a file without tests), 2 and 4
               (collection errors, a conftest that does not import, bad arguments) an error of the
               task's own, anything else an infrastructure error; per-test outcomes come from the
               plugin's DTF_TEST_REPORT file.
    command    /bin/sh -c <command>: exit 0 passed, else failed; it counts as one test.
    benchmark  like command, plus DTF_METRICS=<attempt_dir>/metrics.json for the benchmark to write
               a JSON object of numbers into, DTF_CONFIG=<json> and DTF_CONFIG_<KEY>=<value> for each
               config key; the config also becomes the result's labels. A zero exit without valid
               metrics is an error.

An error result says whose fault it is (`RunResult.category`, ResultReported.category): "task" when
the task's code, arguments or spec are (final, and no mark against the worker), else the worker's
("worker": it cannot run the task's program) or "unknown" (pytest's internal error, a killing signal).

`config.cwd` (relative to workdir, or absolute) picks the working directory. Process handling
(process group, timeout, cancel, capped log) lives in `process`; the child's environment in
`environment`. Why the worker ended or judged an attempt as it did is appended to the log as a
`[dtf] ...` line, so it shows in `output_tail` (and the coordinator's reason for a retry).
"""

from __future__ import annotations

import asyncio
import re
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from dtf.events import ErrorCategory, Outcome, TestCounts, TestOutcome
from dtf.spec import SpecError, TaskSpec, benchmark_labels, command_line, test_args, test_paths
from dtf.workers import environment, results, sandbox
from dtf.workers.process import MAX_LOG_BYTES, LogSink, ProcessResult, run_process
from dtf.workers.pyenv import PLUGIN_MODULE, BuildError, Env, EnvCache

LOG_NAME = "output.log"
TEST_REPORT_NAME = "tests.jsonl"
METRICS_NAME = "metrics.json"
PLUGIN = "dtf.workers.pytest_plugin"

Launch = Callable[..., Awaitable[ProcessResult]]
"""`run_process`'s signature: (argv, *, cwd, env, sink, timeout, cancel) -> ProcessResult."""

PYTEST_EXIT_REASONS = {
    2: "pytest was interrupted",
    3: "pytest hit an internal error",
    4: "pytest could not start the tests (a usage error)",
}
TASK_EXIT_CODES = frozenset({2, 4})
"""pytest's exit codes for what the tests themselves got wrong (pytest.ExitCode.INTERRUPTED, for a
collection error or pytest.exit(); USAGE_ERROR, for bad arguments or a conftest that does not
import): the same on any worker, so not retried and not the worker's fault."""
MAX_REASON = 500
"""A reason is a line for a report; the log holds the rest."""
_COMPLAINT = re.compile(r"^(?:E {3}.*|ERROR: (?!usage:).*|.*: error: .*)$", re.M)
"""pytest's own words about what stopped it: an exception line, an ERROR line, argparse's error."""


@dataclass
class RunResult:
    outcome: Outcome
    exit_code: int | None
    duration_s: float
    counts: TestCounts
    tests: list[TestOutcome]
    metrics: dict[str, float]
    labels: dict[str, str]
    output_tail: str
    log_path: Path
    reason: str = ""
    log_truncated: bool = False
    category: ErrorCategory | None = None
    """Whose fault an "error" is (module docstring); None for the other outcomes."""


@dataclass
class _Plan:
    argv: list[str]
    cwd: Path
    env: dict[str, str]


def working_directory(spec: TaskSpec, workdir: Path) -> Path:
    cwd = spec.config.get("cwd")
    if cwd is None:
        return workdir
    if not isinstance(cwd, str) or not cwd:
        raise SpecError("config.cwd must be a path (relative to the workspace, or absolute)")
    return workdir / cwd  # an absolute cwd replaces workdir


def labels_for(spec: TaskSpec) -> dict[str, str]:
    """A benchmark's config becomes labels (with the spec's own labels on top); others keep theirs."""
    return benchmark_labels(spec) if spec.type == "benchmark" else dict(spec.labels)


def plan(spec: TaskSpec, workdir: Path, attempt_dir: Path, python: str, pyenv: Env | None = None) -> _Plan:
    """The command line, directory and environment for a spec; SpecError when it cannot run. In a
    task's own `pyenv` only the env's own plugins load (named, with autoload off: the worker's
    hypothesis, xdist... must not), and dtf's reporter comes from a standalone module."""
    env = environment.scrubbed()
    cwd = working_directory(spec, workdir)
    if spec.type == "test":
        env["DTF_TEST_REPORT"] = str(attempt_dir / TEST_REPORT_NAME)
        prefix = spec.config.get("source_prefix")
        if isinstance(prefix, str) and prefix:  # where the tree sits in the submitter's: see the plugin
            env["DTF_SOURCE_PREFIX"] = prefix
        plugins = ["-p", PLUGIN]
        if pyenv is not None:
            python = pyenv.python
            env["PYTHONPATH"] = str(pyenv.plugin_dir)
            env["PYTEST_DISABLE_PLUGIN_AUTOLOAD"] = "1"
            plugins = [arg for name in [PLUGIN_MODULE, *pyenv.plugins] for arg in ("-p", name)]
        argv = [python, "-m", "pytest", *test_paths(spec), *test_args(spec),
                *plugins, "-p", "no:cacheprovider", "-q"]
        return _Plan(argv, cwd, env)
    argv = ["/bin/sh", "-c", command_line(spec)]
    if spec.type == "benchmark":
        env["DTF_METRICS"] = str(attempt_dir / METRICS_NAME)
        env.update(environment.config_vars(spec.config))
    return _Plan(argv, cwd, env)


async def run_attempt(
    spec: TaskSpec, workdir: Path, attempt_dir: Path, *, python: str = sys.executable,
    on_output: Callable[[bytes], None] | None = None, cancel: asyncio.Event | None = None,
    max_log_bytes: int = MAX_LOG_BYTES, launch: Launch = run_process, envs: EnvCache | None = None,
    uid: int | None = None,
) -> RunResult:
    """Run one attempt to its end; never raises for anything the task does (only for a broken
    attempt_dir). `cancel` ends it early with outcome "cancelled". `launch` runs the planned command
    (`process.run_process`; a warm pytest process's launcher serves a split shard instead). A test
    task with `spec.env` runs in its env from `envs`, built first when not cached. `uid`, when set,
    is the user it runs as (`sandbox`), and HOME/TMPDIR then point into attempt_dir."""
    cancel = cancel or asyncio.Event()
    attempt_dir = Path(attempt_dir)
    attempt_dir.mkdir(parents=True, exist_ok=True)
    for leftover in (TEST_REPORT_NAME, METRICS_NAME):  # from an earlier run in the same directory
        (attempt_dir / leftover).unlink(missing_ok=True)
    sink = LogSink(attempt_dir / LOG_NAME, max_bytes=max_log_bytes, on_output=on_output)
    try:
        result = await _run(spec, Path(workdir), attempt_dir, python, cancel, sink, launch, envs, uid)
        result.labels = labels_for(spec)
        return result
    finally:
        sink.close()


async def _run(spec: TaskSpec, workdir: Path, attempt_dir: Path, python: str, cancel: asyncio.Event,
               sink: LogSink, launch: Launch, envs: EnvCache | None, uid: int | None) -> RunResult:
    pyenv = None
    if spec.type == "test" and spec.env is not None:
        if envs is None:
            return _without_process(spec, sink, "error", "this worker has no environment cache", "worker")
        try:
            pyenv = await envs.ensure(spec.env)
        except BuildError as exc:  # the requirements' fault: they fail the same on every worker
            sink.write(str(exc).encode())
            return _without_process(spec, sink, "error", f"cannot build the task's environment: "
                                    f"{_last_line(str(exc))}"[:MAX_REASON], "task")
        except OSError as exc:
            return _without_process(spec, sink, "error", f"cannot build the task's environment: {exc}", "worker")
        sink.note(f"python environment {pyenv.path.name} ({'built' if pyenv.built else 'cached'})")
    try:
        planned = plan(spec, Path(workdir), attempt_dir, python, pyenv)
        if sandbox.sandbox.fresh_dir:
            planned.env = sandbox.task_env(planned.env, attempt_dir)
    except SpecError as exc:
        return _without_process(spec, sink, "error", f"cannot run this task: {exc}", "task")
    if not planned.cwd.is_dir():
        return _without_process(spec, sink, "error", f"working directory {planned.cwd} does not exist",
                                "task")
    if cancel.is_set():
        return _without_process(spec, sink, "cancelled", "cancelled before it started")
    try:
        proc = await launch(planned.argv, cwd=planned.cwd, env=planned.env, sink=sink,
                            timeout=spec.timeout_seconds, cancel=cancel, **({} if uid is None else {"uid": uid}))
    except OSError as exc:
        return _without_process(spec, sink, "error", f"cannot start {planned.argv[0]}: {exc}", "worker")
    if spec.type == "test":
        return await _judge_tests(spec, proc, attempt_dir, sink)
    return await _judge_command(spec, proc, attempt_dir, sink)


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else "uv failed"


def _ended_early(proc: ProcessResult, timeout: float, sink: LogSink) -> tuple[Outcome, str] | None:
    if proc.ended_by == "timeout":
        reason = f"timed out after {timeout:g}s: killed the process group"
        sink.note(reason)
        return "timed_out", reason
    if proc.ended_by == "cancel":
        sink.note("cancelled: killed the process group")
        return "cancelled", "cancelled"
    return None


async def _judge_tests(spec: TaskSpec, proc: ProcessResult, attempt_dir: Path, sink: LogSink) -> RunResult:
    tests = await asyncio.to_thread(results.read_test_report, attempt_dir / TEST_REPORT_NAME)
    early = _ended_early(proc, spec.timeout_seconds, sink)
    category: ErrorCategory | None = None
    if early is not None:
        outcome, reason = early
    elif proc.exit_code == 0:
        outcome, reason = "passed", ""
    elif proc.exit_code == 5:  # nothing selected (`-k`, a file without tests): nothing failed either
        outcome, reason = "passed", "no tests selected: pytest collected none"
        sink.note(reason)
    elif proc.exit_code == 1 and tests:
        outcome, reason = "failed", ""
    elif proc.exit_code == 1:  # e.g. "No module named pytest": nothing ran, so nothing failed
        outcome, category = "error", "worker"
        reason = "pytest exited with code 1 without reporting any test (is pytest installed for this python?)"
        sink.note(reason)
    else:
        outcome = "error"
        category = "task" if proc.exit_code in TASK_EXIT_CODES else "unknown"
        reason = _pytest_complaint(proc.exit_code, tests, sink.tail_text())
        sink.note(reason)
    return _result(outcome, proc, tests, {}, sink, reason, category)


def _pytest_complaint(exit_code: int | None, tests: list[TestOutcome], output: str) -> str:
    """One line on why pytest stopped: the first collection error (it names the file), else pytest's
    last complaint in the output, after what the exit code means."""
    broken = [t for t in tests if t.outcome == "error" and t.message.startswith("collection error")]
    if broken:
        more = f" (+{len(broken) - 1} more)" if len(broken) > 1 else ""
        return f"{broken[0].nodeid}: {' '.join(broken[0].message.split())}"[:MAX_REASON - len(more)] + more
    meaning = PYTEST_EXIT_REASONS.get(exit_code or 0, "pytest ended abnormally")
    complaints = _COMPLAINT.findall(output)
    said = f": {' '.join(complaints[-1].split())}" if complaints else ""
    return f"{meaning} (exit code {exit_code}){said}"[:MAX_REASON]


async def _judge_command(spec: TaskSpec, proc: ProcessResult, attempt_dir: Path, sink: LogSink) -> RunResult:
    metrics: dict[str, float] = {}
    category: ErrorCategory | None = None
    early = _ended_early(proc, spec.timeout_seconds, sink)
    if early is not None:
        outcome, reason = early
    elif proc.exit_code == 0:
        outcome, reason = "passed", ""
        if spec.type == "benchmark":
            try:
                metrics = await asyncio.to_thread(results.read_metrics, attempt_dir / METRICS_NAME)
            except results.MetricsError as exc:
                outcome, reason, category = "error", str(exc), "task"
                sink.note(reason)
    else:
        outcome, reason = "failed", f"exited with code {proc.exit_code}"
        if spec.type == "benchmark":  # keep whatever a failing benchmark managed to measure
            try:
                metrics = await asyncio.to_thread(results.read_metrics, attempt_dir / METRICS_NAME)
            except results.MetricsError:
                pass
    tests = [] if outcome == "cancelled" else [_single_test(spec, outcome, proc.duration_s, reason)]
    return _result(outcome, proc, tests, metrics, sink, reason, category)


def _single_test(spec: TaskSpec, outcome: Outcome, duration_s: float, reason: str) -> TestOutcome:
    status = outcome if outcome in ("passed", "failed") else "error"
    return TestOutcome(nodeid=spec.name or spec.type, outcome=status, duration_s=round(duration_s, 6),
                       message=reason[:500])


def _result(outcome: Outcome, proc: ProcessResult, tests: list[TestOutcome], metrics: dict[str, float],
            sink: LogSink, reason: str, category: ErrorCategory | None = None) -> RunResult:
    return RunResult(
        outcome=outcome, exit_code=proc.exit_code, duration_s=round(proc.duration_s, 6),
        counts=results.count(tests), tests=tests, metrics=metrics, labels={},
        output_tail=sink.tail_text(), log_path=sink.path, reason=reason, log_truncated=sink.truncated,
        category=category,
    )


def _without_process(spec: TaskSpec, sink: LogSink, outcome: Outcome, reason: str,
                     category: ErrorCategory | None = None) -> RunResult:
    sink.note(reason)
    tests = [] if outcome == "cancelled" or spec.type == "test" else [_single_test(spec, outcome, 0.0, reason)]
    return RunResult(
        outcome=outcome, exit_code=None, duration_s=0.0, counts=results.count(tests), tests=tests,
        metrics={}, labels={}, output_tail=sink.tail_text(), log_path=sink.path, reason=reason,
        category=category,
    )
