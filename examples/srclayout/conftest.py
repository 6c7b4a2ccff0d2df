import pytest


@pytest.fixture
def unit_square():
    from shapes import Rectangle

    return Rectangle(1, 1)
