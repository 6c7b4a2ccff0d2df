"""A suite with 3 passing, 1 failing and 1 skipped test (used by the end-to-end tests)."""

import pytest


def test_one():
    assert 1 == 1


def test_two():
    assert "a" * 2 == "aa"


def test_three():
    assert [1, 2] + [3] == [1, 2, 3]


def test_fails_on_purpose():
    assert 2 + 2 == 5


@pytest.mark.skip(reason="skipped on purpose")
def test_skipped():
    pass
