"""Example tests that take a moment, so two workers visibly share the suite."""

import time

import pytest


@pytest.mark.parametrize("n", range(4))
def test_takes_a_moment(n):
    time.sleep(0.25)
    assert n >= 0
