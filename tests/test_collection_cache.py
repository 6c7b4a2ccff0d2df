"""`dtf submit --split` collects a shipped suite once per content: a real `pytest --collect-only`
in a temp tree, counted by a conftest hook; the cache lives in a temp $XDG_CACHE_HOME."""

from __future__ import annotations

import pytest

from dtf.cli import splitting

SHA_A, SHA_B = "a" * 64, "b" * 64


@pytest.fixture
def suite(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = tmp_path / "suite"
    root.mkdir()
    (root / "test_one.py").write_text("def test_x():\n    pass\n\ndef test_y():\n    pass\n")
    log = tmp_path / "collections.log"
    (root / "conftest.py").write_text(
        f"def pytest_collection_finish(session):\n    open({str(log)!r}, 'a').write('collected\\n')\n")
    return root, log


def collections(log) -> int:
    return log.read_text().count("collected") if log.exists() else 0


def test_the_same_workspace_collected_the_same_way_is_answered_from_the_cache(suite):
    root, log = suite
    first, cached = splitting.cached_collect(root, ["."], [], SHA_A)
    assert (first, cached) == (["test_one.py::test_x", "test_one.py::test_y"], False)
    again, cached = splitting.cached_collect(root, ["."], [], SHA_A)
    assert (again, cached) == (first, True)
    assert collections(log) == 1


def test_other_content_or_other_arguments_collect_again(suite):
    root, log = suite
    splitting.cached_collect(root, ["."], [], SHA_A)
    (root / "test_one.py").write_text("def test_z():\n    pass\n")
    changed, cached = splitting.cached_collect(root, ["."], [], SHA_B)
    assert (changed, cached) == (["test_one.py::test_z"], False)
    narrowed, cached = splitting.cached_collect(root, ["."], ["-k", "test_z"], SHA_B)
    assert (narrowed, cached) == (["test_one.py::test_z"], False)
    assert collections(log) == 3


def test_an_unshipped_suite_has_no_content_hash_and_is_always_collected(suite):
    root, log = suite
    for _ in range(2):
        assert splitting.cached_collect(root, ["."], [], None)[1] is False
    assert collections(log) == 2


def test_a_damaged_cache_entry_is_collected_again_and_replaced(suite):
    root, log = suite
    splitting.cached_collect(root, ["."], [], SHA_A)
    [entry] = splitting.collections_dir().iterdir()
    entry.write_text("{not json")
    assert splitting.cached_collect(root, ["."], [], SHA_A)[1] is False
    assert splitting.cached_collect(root, ["."], [], SHA_A)[1] is True
    assert collections(log) == 2
