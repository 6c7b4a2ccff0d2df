"""The live dashboard (#6): `dtf dashboard`."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
