import pytest

from shapes import Rectangle


@pytest.mark.geometry
def test_a_unit_square_has_area_one(unit_square):
    assert unit_square.area == 1


@pytest.mark.parametrize("width,height", [(2, 3), (0.5, 4)])
def test_area_is_width_times_height(width, height):
    assert Rectangle(width, height).area == width * height
