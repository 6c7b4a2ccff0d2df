"""`dtf submit --split`'s collection: in parallel slices that add up to one collection, and once per
content of a shipped suite. A real `pytest --collect-only` in a temp tree, its sessions counted by a
conftest hook; the cache lives in a temp $XDG_CACHE_HOME."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dtf.cli import collection
from dtf.cli.common import CliError

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
    first, cached = collection.cached_collect(root, ["."], [], SHA_A)
    assert (first, cached) == (["test_one.py::test_x", "test_one.py::test_y"], False)
    again, cached = collection.cached_collect(root, ["."], [], SHA_A)
    assert (again, cached) == (first, True)
    assert collections(log) == 1


def test_other_content_or_other_arguments_collect_again(suite):
    root, log = suite
    collection.cached_collect(root, ["."], [], SHA_A)
    (root / "test_one.py").write_text("def test_z():\n    pass\n")
    changed, cached = collection.cached_collect(root, ["."], [], SHA_B)
    assert (changed, cached) == (["test_one.py::test_z"], False)
    narrowed, cached = collection.cached_collect(root, ["."], ["-k", "test_z"], SHA_B)
    assert (narrowed, cached) == (["test_one.py::test_z"], False)
    assert collections(log) == 3


def test_an_unshipped_suite_has_no_content_hash_and_is_always_collected(suite):
    root, log = suite
    for _ in range(2):
        assert collection.cached_collect(root, ["."], [], None)[1] is False
    assert collections(log) == 2


def test_a_damaged_cache_entry_is_collected_again_and_replaced(suite):
    root, log = suite
    collection.cached_collect(root, ["."], [], SHA_A)
    [entry] = collection.collections_dir().iterdir()
    entry.write_text("{not json")
    assert collection.cached_collect(root, ["."], [], SHA_A)[1] is False
    assert collection.cached_collect(root, ["."], [], SHA_A)[1] is True
    assert collections(log) == 2


@pytest.fixture
def big_suite(tmp_path, monkeypatch):
    """Eight files in two packages, one skipped as a module, with a conftest that counts sessions."""
    monkeypatch.setattr(collection, "PARALLEL_MIN_FILES", 4)
    root = tmp_path / "big"
    log = tmp_path / "sessions.log"
    for package in ("alpha", "beta"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
        for i in range(4):
            (root / package / f"test_{i}.py").write_text(
                "".join(f"def test_{package}_{i}_{j}():\n    pass\n\n" for j in range(i + 1)))
    (root / "beta" / "test_2.py").write_text("import pytest\n\npytest.skip('not here', allow_module_level=True)\n")
    (root / "conftest.py").write_text(
        f"def pytest_collection_finish(session):\n    open({str(log)!r}, 'a').write('collected\\n')\n")
    return root, log


def test_parallel_slices_collect_exactly_what_one_collection_does_in_its_order(big_suite):
    root, log = big_suite
    once = collection.collect_once(root, ["."], [])
    assert collections(log) == 1
    parallel = collection.collect(root, ["."], [], collectors=2)
    assert parallel == once and len(once) == 17
    assert collections(log) == 1 + 3  # a discovery that imports no test module, then two slices


def test_node_id_arguments_and_one_core_collect_in_one_go(big_suite):
    root, log = big_suite
    ids = collection.collect(root, ["alpha/test_3.py::test_alpha_3_0", "beta"], [], collectors=2)
    assert ids == ["alpha/test_3.py::test_alpha_3_0", *collection.collect_once(root, ["beta"], [])]
    assert collection.collect(root, ["."], [], collectors=1) == collection.collect_once(root, ["."], [])
    assert collections(log) == 1 + 1 + 1 + 1


def test_an_error_in_one_slice_stops_the_collection_with_pytests_words(big_suite):
    root, _ = big_suite
    (root / "beta" / "test_3.py").write_text("import no_such_module\n")
    with pytest.raises(CliError, match="no_such_module"):
        collection.collect(root, ["."], [], collectors=2)


@given(st.lists(st.integers(min_value=0, max_value=10_000), min_size=1, max_size=60),
       st.integers(min_value=1, max_value=8))
def test_slices_keep_every_file_once_in_order_in_at_most_the_parts_asked(sizes, parts):
    files = [f"f{i}.py" for i in range(len(sizes))]
    cut = collection.slices(files, sizes, parts)
    assert [name for part in cut for name in part] == files
    assert 1 <= len(cut) <= parts and all(cut)
