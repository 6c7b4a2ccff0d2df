"""The attempt runner against real child processes: pytest suites, shell commands and benchmarks written
into tmp_path, with timeouts and cancellation that must take down whole process groups."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from pathlib import Path

import psutil
import pytest

from dtf.spec import TaskSpec
from dtf.workers.runner import run_attempt

SUITE = '''
import pytest

def test_passes():
    assert True

def test_fails():
    assert 1 == 2, "one is not two"

@pytest.mark.skip(reason="not today")
def test_skipped():
    pass

@pytest.mark.xfail(reason="known bug")
def test_xfails():
    assert False

@pytest.mark.xfail(reason="fixed now")
def test_xpasses():
    pass

@pytest.fixture
def broken():
    raise RuntimeError("setup broke")

def test_setup_error(broken):
    pass

@pytest.fixture
def bad_teardown():
    yield
    raise RuntimeError("teardown broke")

def test_teardown_error(bad_teardown):
    pass
'''


def write_suite(root: Path, body: str = SUITE, name: str = "test_sample.py") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / name).write_text(textwrap.dedent(body))
    return root


def command(cmd: str, **config) -> TaskSpec:
    return TaskSpec(type="command", name="cmd", config={"command": cmd, **config})


async def run(spec: TaskSpec, tmp_path: Path, **kwargs):
    return await run_attempt(spec, tmp_path, tmp_path / "attempt", python=sys.executable, **kwargs)


def dead(pid: int) -> bool:
    """No such process, or a zombie nobody reaped yet (in a container without an init)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def gone(pid: int) -> bool:
    """Dead within a few seconds: SIGKILL is delivered asynchronously, so a process can still be
    finishing its exit for a moment after its pipe closed."""
    for _ in range(100):
        if dead(pid):
            return True
        await asyncio.sleep(0.05)
    return False


async def test_a_pytest_task_reports_every_test_with_its_outcome(tmp_path):
    write_suite(tmp_path / "suite")
    spec = TaskSpec(type="test", config={"paths": ["suite"]})
    result = await run(spec, tmp_path, cancel=asyncio.Event())
    outcomes = {t.nodeid: t.outcome for t in result.tests}
    assert outcomes == {
        "suite/test_sample.py::test_passes": "passed",
        "suite/test_sample.py::test_fails": "failed",
        "suite/test_sample.py::test_skipped": "skipped",
        "suite/test_sample.py::test_xfails": "skipped",
        "suite/test_sample.py::test_xpasses": "passed",
        "suite/test_sample.py::test_setup_error": "error",
        "suite/test_sample.py::test_teardown_error": "error",
    }
    assert (result.outcome, result.exit_code) == ("failed", 1)
    assert (result.counts.passed, result.counts.failed, result.counts.skipped, result.counts.errors) == (2, 1, 2, 2)
    messages = {t.nodeid.split("::")[1]: t.message for t in result.tests}
    assert "one is not two" in messages["test_fails"]
    assert "not today" in messages["test_skipped"]
    assert "setup broke" in messages["test_setup_error"]
    assert "teardown broke" in messages["test_teardown_error"]
    assert result.log_path.read_text().count("failed") >= 1


async def test_a_passing_pytest_task_passes_and_honours_pytest_args_and_cwd(tmp_path):
    write_suite(tmp_path / "proj" / "tests", "def test_one():\n    pass\n\ndef test_two():\n    pass\n")
    spec = TaskSpec(type="test", config={"paths": ["tests"], "pytest_args": ["-k", "one"], "cwd": "proj"})
    result = await run(spec, tmp_path)
    assert result.outcome == "passed"
    assert [t.nodeid for t in result.tests] == ["tests/test_sample.py::test_one"]


@pytest.mark.parametrize("selection", [["empty"], ["suite", "-k", "no_such_test"]], ids=["no test files", "-k"])
async def test_a_pytest_task_that_selects_no_tests_passes_with_none_and_says_so(tmp_path, selection):
    (tmp_path / "empty").mkdir()
    write_suite(tmp_path / "suite", "def test_fine():\n    pass\n")
    path, *pytest_args = selection
    result = await run(TaskSpec(type="test", config={"paths": [path], "pytest_args": pytest_args}), tmp_path)
    assert (result.outcome, result.exit_code, result.tests, result.category) == ("passed", 5, [], None)
    assert "no tests selected" in result.reason and "no tests selected" in result.output_tail


async def test_a_suite_that_fails_to_collect_is_an_error_of_the_task_naming_the_broken_file(tmp_path):
    write_suite(tmp_path / "suite", "def test_fine():\n    pass\n", name="test_fine.py")
    write_suite(tmp_path / "suite", "def test_broken(:\n", name="test_broken.py")
    result = await run(TaskSpec(type="test", config={"paths": ["suite"]}), tmp_path)
    assert (result.outcome, result.exit_code, result.category) == ("error", 2, "task")
    errors = [t for t in result.tests if t.outcome == "error"]
    assert [t.nodeid for t in errors] == ["suite/test_broken.py"] and "collection error" in errors[0].message
    assert result.counts.errors == 1
    assert result.reason == "suite/test_broken.py: collection error: SyntaxError: invalid syntax"


@pytest.mark.parametrize(("conftest", "arguments", "said"), [
    ("", ["suite", "--no-such-option"], "unrecognized arguments: --no-such-option"),
    ("import no_such_module\n", ["suite"], "No module named 'no_such_module'"),
    ("", ["suite/test_sample.py::test_gone"], "not found"),
], ids=["bad option", "conftest that does not import", "missing node id"])
async def test_a_pytest_usage_error_is_an_error_of_the_task_in_pytests_words(tmp_path, conftest, arguments, said):
    write_suite(tmp_path / "suite", "def test_fine():\n    pass\n")
    write_suite(tmp_path / "suite", conftest, name="conftest.py")
    path, *pytest_args = arguments
    result = await run(TaskSpec(type="test", config={"paths": [path], "pytest_args": pytest_args}), tmp_path)
    assert (result.outcome, result.exit_code, result.category) == ("error", 4, "task")
    assert said in result.reason and "usage error" in result.reason


async def test_a_python_without_pytest_is_an_error_not_a_test_failure(tmp_path):
    write_suite(tmp_path / "suite", "def test_fine():\n    pass\n")
    fake_python = tmp_path / "python-without-pytest"
    fake_python.write_text("#!/bin/sh\necho 'No module named pytest' >&2\nexit 1\n")
    fake_python.chmod(0o755)
    spec = TaskSpec(type="test", config={"paths": ["suite"]})
    result = await run_attempt(spec, tmp_path, tmp_path / "attempt", python=str(fake_python))
    assert result.outcome == "error" and "without reporting any test" in result.reason
    assert result.category == "worker"  # this worker's python cannot run tests: the worker's fault


async def test_a_command_passes_on_exit_zero_and_counts_as_one_test(tmp_path):
    chunks: list[bytes] = []
    result = await run(command("echo hello from the task"), tmp_path, on_output=chunks.append)
    assert (result.outcome, result.exit_code) == ("passed", 0)
    assert (result.counts.passed, len(result.tests), result.tests[0].nodeid) == (1, 1, "cmd")
    assert "hello from the task" in result.output_tail
    assert b"hello from the task" in b"".join(chunks)
    assert "hello from the task" in result.log_path.read_text()


async def test_a_command_fails_on_a_nonzero_exit_with_stderr_in_the_log(tmp_path):
    result = await run(command("echo oops >&2; exit 3"), tmp_path)
    assert (result.outcome, result.exit_code, result.counts.failed) == ("failed", 3, 1)
    assert "oops" in result.log_path.read_text()


async def test_the_config_cwd_sets_the_working_directory(tmp_path):
    (tmp_path / "sub").mkdir()
    result = await run(command("pwd", cwd="sub"), tmp_path)
    assert result.output_tail.strip().endswith("/sub")


async def test_a_missing_working_directory_is_an_error_without_running_anything(tmp_path):
    result = await run(command("touch ran", cwd="nowhere"), tmp_path)
    assert result.outcome == "error" and "does not exist" in result.reason
    assert not (tmp_path / "ran").exists()


async def test_a_benchmark_reports_its_metrics_and_its_config_as_labels_and_env(tmp_path):
    spec = TaskSpec(type="benchmark", labels={"suite": "nightly"}, config={
        "command": 'printf \'{"throughput": 123.5, "latency_ms": 4}\' > "$DTF_METRICS"; '
                   'echo "model=$DTF_CONFIG_MODEL sizes=$DTF_CONFIG_BATCH_SIZES config=$DTF_CONFIG"',
        "model": "resnet50", "batch_sizes": [1, 8], "precision": "fp16",
    })
    result = await run(spec, tmp_path)
    assert result.outcome == "passed"
    assert result.metrics == {"throughput": 123.5, "latency_ms": 4.0}
    assert result.labels == {"model": "resnet50", "batch_sizes": "1,8", "precision": "fp16", "suite": "nightly"}
    assert "model=resnet50 sizes=1,8" in result.output_tail
    assert '"precision": "fp16"' in result.output_tail


async def test_a_benchmark_with_non_numeric_metrics_is_an_error_naming_them(tmp_path):
    spec = TaskSpec(type="benchmark", config={
        "command": 'echo \'{"throughput": "fast", "ok": 1}\' > "$DTF_METRICS"'})
    result = await run(spec, tmp_path)
    assert result.outcome == "error"
    assert "throughput" in result.reason and result.metrics == {}
    assert result.counts.errors == 1


async def test_a_benchmark_that_writes_no_metrics_is_an_error(tmp_path):
    result = await run(TaskSpec(type="benchmark", config={"command": "true"}), tmp_path)
    assert result.outcome == "error" and "no metrics file" in result.reason
    assert result.category == "task"


@pytest.mark.parametrize("link", ["ln -s", "ln"])
async def test_a_benchmark_whose_metrics_file_links_elsewhere_is_an_error_and_nothing_of_that_file_is_read(
        tmp_path, link):
    elsewhere = tmp_path / "someone-elses.json"  # a file the worker can read and the task should not see
    elsewhere.write_text('{"secret_number": 42}')
    spec = TaskSpec(type="benchmark", config={"command": f'{link} {elsewhere} "$DTF_METRICS"'})
    result = await run(spec, tmp_path)
    assert result.outcome == "error" and "not reading the metrics file" in result.reason, result.reason
    assert result.metrics == {} and "secret_number" not in result.reason


async def test_a_test_task_whose_report_links_to_another_report_reports_none_of_its_tests(tmp_path):
    other = tmp_path / "other-tenant.jsonl"
    other.write_text('{"nodeid": "their_test.py::test_secret", "outcome": "failed", "message": "their data"}\n')
    suite = write_suite(tmp_path / "suite", f"""
        import os

        def test_swaps_the_report():
            report = os.environ["DTF_TEST_REPORT"]
            if os.path.exists(report):
                os.unlink(report)
            os.symlink({str(other)!r}, report)
        """)
    result = await run(TaskSpec(type="test", config={"path": str(suite)}), tmp_path)
    assert "their_test.py::test_secret" not in [t.nodeid for t in result.tests]


async def test_a_timeout_kills_the_whole_process_group_including_a_grandchild(tmp_path):
    spec = TaskSpec(type="command", timeout_seconds=1, config={
        "command": "sleep 60 & echo $! > grandchild.pid; echo started; wait"})
    result = await run(spec, tmp_path)
    assert result.outcome == "timed_out"
    assert "timed out after 1s" in result.output_tail
    assert await gone(int((tmp_path / "grandchild.pid").read_text()))


async def test_a_child_that_ignores_sigterm_is_killed_after_the_grace_period(tmp_path):
    spec = TaskSpec(type="command", timeout_seconds=0.5, config={
        "command": "trap '' TERM; sleep 60 & echo $! > grandchild.pid; wait"})
    result = await run(spec, tmp_path)
    assert result.outcome == "timed_out"
    assert await gone(int((tmp_path / "grandchild.pid").read_text()))


async def test_a_background_process_left_behind_by_a_finished_task_is_killed(tmp_path):
    result = await run(command("sleep 60 & echo $! > straggler.pid; echo done"), tmp_path)
    assert result.outcome == "passed"
    assert await gone(int((tmp_path / "straggler.pid").read_text()))


async def test_cancelling_a_running_attempt_kills_it_and_reports_cancelled(tmp_path):
    cancel = asyncio.Event()

    def on_output(chunk: bytes) -> None:
        if b"ready" in chunk:
            cancel.set()

    spec = command("sleep 60 & echo $! > child.pid; echo ready; wait")
    result = await run(spec, tmp_path, on_output=on_output, cancel=cancel)
    assert result.outcome == "cancelled" and result.tests == []
    assert await gone(int((tmp_path / "child.pid").read_text()))


async def test_the_child_environment_is_scrubbed_of_credentials(tmp_path, monkeypatch):
    for name in ("NATS_URL", "DTF_CREDS", "MY_API_TOKEN", "db_password", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "leaked")
    monkeypatch.setenv("KEEP_ME", "kept")
    result = await run(command("env"), tmp_path)
    log = result.log_path.read_text()
    assert "KEEP_ME=kept" in log
    assert "leaked" not in log


async def test_the_log_file_stops_growing_at_its_cap_and_says_so(tmp_path):
    spec = command("head -c 5000 /dev/zero | tr '\\0' 'x'; echo; echo the-end")
    result = await run(spec, tmp_path, max_log_bytes=1000)
    text = result.log_path.read_text()
    assert result.log_truncated and "output truncated" in text
    assert text.count("x") == 1000
    assert "the-end" in result.output_tail
