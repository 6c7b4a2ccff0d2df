"""Online detection and forecasts (#5): `dtf detector`, `dtf anomalies`, `dtf forecast`."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
