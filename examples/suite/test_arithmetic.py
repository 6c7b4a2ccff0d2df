"""Example tests: plain arithmetic, parametrized."""

import pytest


@pytest.mark.parametrize("a, b, total", [(1, 1, 2), (2, 3, 5), (10, -4, 6)])
def test_addition(a, b, total):
    assert a + b == total


def test_integer_division_rounds_down():
    assert 7 // 2 == 3
