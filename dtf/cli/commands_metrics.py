"""Observability (#6): `dtf grafana`, the Grafana dashboard over the Prometheus metrics."""

from __future__ import annotations

import click

COMMANDS: list[click.Command] = []
