"""Results, aggregation, flaky tests and CI reports (#5): `dtf results`, `dtf flaky`, `dtf report`."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
