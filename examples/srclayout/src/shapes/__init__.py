"""A package in a src layout: not importable from the project root without `pythonpath = ["src"]`."""

from dataclasses import dataclass


@dataclass(frozen=True)
class Rectangle:
    width: float
    height: float

    @property
    def area(self) -> float:
        return self.width * self.height
