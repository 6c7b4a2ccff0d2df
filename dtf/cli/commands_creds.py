"""Access control (#7): `dtf creds ...`."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
