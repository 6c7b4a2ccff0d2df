"""Example tests: strings, with a class sharing a fixture."""

import sys

import pytest


class TestWords:
    @pytest.fixture
    def words(self):
        return "the quick brown fox".split()

    def test_count(self, words):
        assert len(words) == 4

    def test_longest(self, words):
        assert max(words, key=len) == "quick"


@pytest.mark.skipif(sys.platform != "win32", reason="only meaningful on Windows")
def test_windows_line_endings():
    assert "a\r\nb".splitlines() == ["a", "b"]
