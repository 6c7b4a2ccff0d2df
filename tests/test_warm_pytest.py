"""A warm pytest process serving split shards: real pytest children on a small temporary suite."""

from __future__ import annotations

import os
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest

from dtf import pyenv
from dtf.spec import TaskSpec
from dtf.workers import warm
from dtf.workers.runner import run_attempt

SUITE = {
    "test_mixed.py": """
        import pytest

        @pytest.fixture
        def broken():
            raise RuntimeError("fixture broke")

        def test_pass():
            pass

        def test_fail():
            print("printed by test_fail")
            assert 1 == 2

        def test_skip():
            pytest.skip("not here")

        def test_error(broken):
            pass

        @pytest.mark.xfail(reason="known")
        def test_xfail():
            assert False

        class TestGroup:
            def test_in_class(self):
                pass
    """,
    "test_other.py": """
        def test_loud():
            print("printed by test_loud")
            assert False
    """,
    "test_state.py": """
        import builtins

        def test_first_to_run_in_this_process():
            seen = getattr(builtins, "_dtf_seen", 0)
            builtins._dtf_seen = seen + 1
            assert seen == 0
    """,
    "test_hang.py": """
        import time

        def test_hangs():
            time.sleep(600)
    """,
    "test_crash.py": """
        import os

        def test_takes_the_process_down():
            os._exit(0)
    """,
    "conftest.py": """
        import os

        def pytest_collection_finish(session):
            with open(os.environ["COLLECTIONS_LOG"], "a") as log:
                log.write("collected\\n")
    """,
}
MIXED = ["test_mixed.py::test_pass", "test_mixed.py::test_fail", "test_mixed.py::test_skip",
         "test_mixed.py::test_error", "test_mixed.py::test_xfail", "test_mixed.py::TestGroup::test_in_class"]


@pytest.fixture
def suite(tmp_path, monkeypatch):
    root = tmp_path / "suite"
    root.mkdir()
    for name, text in SUITE.items():
        (root / name).write_text(textwrap.dedent(text))
    monkeypatch.setenv("COLLECTIONS_LOG", str(tmp_path / "collections.log"))
    return root


@pytest.fixture
async def pool(tmp_path):
    pool = warm.WarmPool(tmp_path / "warm", sys.executable)
    yield pool
    await pool.close()


def shard(nodeids: list[str], *, timeout: float = 120, warm_wanted: bool = True) -> TaskSpec:
    return TaskSpec(type="test", timeout_seconds=timeout,
                    config={"paths": nodeids, "split": {"suite": ["."], "warm": warm_wanted}})


async def run(pool, spec, root, attempt_dir, run_id="run-1"):
    return await run_attempt(spec, root, attempt_dir, launch=pool.launcher(run_id, spec))


def outcomes(result) -> dict[str, str]:
    return {t.nodeid: t.outcome for t in result.tests}


def collections(tmp_path: Path) -> int:
    return (tmp_path / "collections.log").read_text().count("collected")


async def test_a_shard_reports_the_same_outcomes_warm_as_cold(suite, pool, tmp_path):
    cold = await run_attempt(shard(MIXED), suite, tmp_path / "cold")
    hot = await run(pool, shard(MIXED), suite, tmp_path / "warm-1")
    assert outcomes(hot) == outcomes(cold) == {
        "test_mixed.py::test_pass": "passed", "test_mixed.py::test_fail": "failed",
        "test_mixed.py::test_skip": "skipped", "test_mixed.py::test_error": "error",
        "test_mixed.py::test_xfail": "skipped", "test_mixed.py::TestGroup::test_in_class": "passed",
    }
    assert (hot.outcome, hot.exit_code, hot.counts) == (cold.outcome, cold.exit_code, cold.counts)
    assert "fixture broke" in {t.nodeid: t.message for t in hot.tests}["test_mixed.py::test_error"]


async def test_later_shards_of_a_run_reuse_the_process_that_collected_once(suite, pool, tmp_path):
    first = await run(pool, shard(["test_mixed.py::test_pass"]), suite, tmp_path / "a1")
    [process] = pool.processes
    second = await run(pool, shard(["test_mixed.py::TestGroup::test_in_class"]), suite, tmp_path / "a2")
    assert (first.outcome, second.outcome) == ("passed", "passed")
    assert pool.processes == [process] and process.alive
    assert collections(tmp_path) == 1


async def test_each_shard_log_holds_its_own_output_and_failures_only(suite, pool, tmp_path):
    one = await run(pool, shard(["test_mixed.py::test_fail"]), suite, tmp_path / "b1")
    two = await run(pool, shard(["test_other.py::test_loud"]), suite, tmp_path / "b2")
    log_one, log_two = one.log_path.read_text(), two.log_path.read_text()
    assert "printed by test_fail" in log_one and "assert 1 == 2" in log_one
    assert "printed by test_loud" not in log_one
    assert "printed by test_loud" in log_two and "printed by test_fail" not in log_two
    assert "1 failed" in log_two


async def test_a_hanging_shard_times_out_its_process_group_is_killed_and_the_next_gets_a_fresh_one(
        suite, pool, tmp_path):
    await run(pool, shard(["test_mixed.py::test_pass"]), suite, tmp_path / "c0")
    [hung] = pool.processes
    result = await run(pool, shard(["test_hang.py::test_hangs"], timeout=3), suite, tmp_path / "c1")
    assert result.outcome == "timed_out"
    assert "timed out after 3s" in result.output_tail
    assert not hung.alive and hung not in pool.processes
    with pytest.raises(ProcessLookupError):
        os.killpg(hung.proc.pid, 0)
    after = await run(pool, shard(["test_mixed.py::test_pass"]), suite, tmp_path / "c2")
    assert after.outcome == "passed"
    assert [p.proc.pid for p in pool.processes] != [hung.proc.pid]


async def test_a_second_run_gets_its_own_process_and_does_not_see_the_first_runs_state(suite, pool, tmp_path):
    state = shard(["test_state.py::test_first_to_run_in_this_process"])
    assert (await run(pool, state, suite, tmp_path / "d1", run_id="run-a")).outcome == "passed"
    # the same run shares its process, as tests of one pytest session do
    assert (await run(pool, state, suite, tmp_path / "d2", run_id="run-a")).outcome == "failed"
    assert (await run(pool, state, suite, tmp_path / "d3", run_id="run-b")).outcome == "passed"
    assert len({p.proc.pid for p in pool.processes}) == 2


async def test_a_run_gets_its_own_copy_of_the_workspace(suite, pool):
    first = await pool.workspace("run-a", suite, "mysuite")
    again = await pool.workspace("run-a", suite, "mysuite")
    other = await pool.workspace("run-b", suite, "mysuite")
    assert first == again != other and first.name == "mysuite"
    assert (first / "test_mixed.py").read_text() == (suite / "test_mixed.py").read_text()


async def test_a_file_a_shard_first_needs_is_collected_then_and_only_once(suite, pool, tmp_path):
    await run(pool, shard(["test_mixed.py::test_pass"]), suite, tmp_path / "e0")
    (suite / "test_new.py").write_text("def test_new():\n    pass\n")
    result = await run(pool, shard(["test_new.py::test_new", "test_mixed.py::test_skip"]), suite, tmp_path / "e1")
    assert outcomes(result) == {"test_new.py::test_new": "passed", "test_mixed.py::test_skip": "skipped"}
    assert "warm pytest not used" not in result.output_tail
    again = await run(pool, shard(["test_new.py::test_new"]), suite, tmp_path / "e2")
    assert again.outcome == "passed" and len(pool.processes) == 1
    assert collections(tmp_path) == 2  # the first shard's file at start, then test_new.py


async def test_a_node_id_its_file_does_not_have_runs_cold_with_a_note(suite, pool, tmp_path):
    await run(pool, shard(["test_mixed.py::test_pass"]), suite, tmp_path / "e0")
    result = await run(pool, shard(["test_mixed.py::test_gone"]), suite, tmp_path / "e1")
    assert result.outcome == "error"
    assert "warm pytest not used: not collected by it: test_mixed.py::test_gone" in result.output_tail


async def test_a_shard_whose_file_fails_to_collect_runs_cold_and_so_do_the_runs_later_shards(
        suite, pool, tmp_path):
    (suite / "test_broken.py").write_text("import no_such_module\n\ndef test_b():\n    pass\n")
    first = await run(pool, shard(["test_mixed.py::test_pass"]), suite, tmp_path / "f0")
    assert first.outcome == "passed" and "warm pytest not used" not in first.output_tail
    broken = await run(pool, shard(["test_broken.py::test_b"]), suite, tmp_path / "f1")
    assert broken.outcome == "error" and "no_such_module" in broken.log_path.read_text()
    assert "warm pytest not used: collecting this shard's files failed" in broken.output_tail
    later = await run(pool, shard(["test_mixed.py::test_pass"]), suite, tmp_path / "f2")
    assert later.outcome == "passed" and "warm pytest not used" not in later.output_tail
    assert pool.processes == []
    assert collections(tmp_path) == 4  # warm: the start, the broken file; cold: the broken file, the later shard


async def test_a_first_shard_whose_file_fails_to_collect_runs_cold(suite, pool, tmp_path):
    (suite / "test_broken.py").write_text("import no_such_module\n\ndef test_b():\n    pass\n")
    result = await run(pool, shard(["test_broken.py::test_b"]), suite, tmp_path / "f1")
    assert result.outcome == "error"
    assert "warm pytest not used: collecting the shard's files failed" in result.output_tail
    assert pool.processes == []


async def test_a_shard_of_whole_files_runs_every_test_in_them_and_a_file_without_tests_passes(
        suite, pool, tmp_path):
    (suite / "test_skipped.py").write_text("import pytest\n\npytest.skip('not here', allow_module_level=True)\n")
    (suite / "test_empty.py").write_text("HELPER = 1\n")
    whole = await run(pool, shard(["test_other.py", "test_skipped.py", "test_state.py"]), suite, tmp_path / "w1")
    assert outcomes(whole) == {"test_other.py::test_loud": "failed",
                               "test_state.py::test_first_to_run_in_this_process": "passed"}
    assert "warm pytest not used" not in whole.output_tail
    for runner in (lambda spec, d: run(pool, spec, suite, d), lambda spec, d: run_attempt(spec, suite, d)):
        empty = await runner(shard(["test_empty.py"]), tmp_path / "w2")  # warm, then cold
        assert empty.outcome == "passed" and empty.tests == []


def test_only_split_shards_that_want_it_and_do_not_use_xdist_or_their_own_env_go_warm():
    assert warm.suite_of(shard(["a.py::t"])) == ["."]
    own_env = msgspec.structs.replace(shard(["a.py::t"]), env=pyenv.make("3.11", ["six"], "requirements.txt"))
    assert warm.suite_of(own_env) is None
    assert warm.suite_of(shard(["a.py::t"], warm_wanted=False)) is None
    assert warm.suite_of(TaskSpec(type="test", config={"paths": ["a.py"]})) is None
    xdist = TaskSpec(type="test", config={"paths": ["a.py::t"], "split": {"suite": ["."]},
                                          "pytest_args": ["-n", "2"]})
    assert warm.suite_of(xdist) is None


def test_replies_are_cut_out_of_the_output_even_across_chunks():
    replies = warm.Replies("tok")
    stream = b"dots...\n\ntok {\"exitstatus\": 1}\nmore"
    out, got = b"", []
    for i in range(len(stream)):
        o, r = replies.feed(stream[i:i + 1])
        out += o
        got += r
    assert out == b"dots...\n\nmore" and got == [{"exitstatus": 1}]
    assert replies.feed(b"\n") == (b"", [])  # a newline may start a marker: held until the next byte
    assert replies.feed(b"tik") == (b"\ntik", [])


async def test_a_process_that_dies_mid_shard_is_an_error_not_a_pass_and_the_next_shard_gets_a_new_one(
        suite, pool, tmp_path):
    result = await run(pool, shard(["test_crash.py::test_takes_the_process_down"]), suite, tmp_path / "g1")
    assert result.outcome == "error"
    assert "the warm pytest process exited (code 0) in the middle of the shard" in result.output_tail
    assert pool.processes == []
    assert (await run(pool, shard(["test_mixed.py::test_pass"]), suite, tmp_path / "g2")).outcome == "passed"


async def test_a_process_that_dies_while_collecting_leaves_the_run_to_cold_shards(suite, pool, tmp_path):
    (suite / "conftest.py").write_text(textwrap.dedent("""
        import os

        def pytest_collection_finish(session):
            if "DTF_WARM_TOKEN" in os.environ:
                os._exit(7)
    """))
    result = await run(pool, shard(["test_mixed.py::test_pass"]), suite, tmp_path / "h1")
    assert result.outcome == "passed"
    assert "warm pytest not used: it exited (code 7) while collecting" in result.output_tail


async def test_what_a_worker_that_did_not_stop_cleanly_left_behind_is_removed_on_first_use(suite, pool):
    stale = pool.root / "run-old-abc" / "workspace"
    stale.mkdir(parents=True)
    copy = await pool.workspace("run-new", suite, "suite")
    assert copy.is_dir() and not stale.exists()
