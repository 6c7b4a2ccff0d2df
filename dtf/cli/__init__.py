"""The `dtf` command line: the composition root, the one place that wires the domain (dtf/) to the
JetStream topology (dtf.streams), the worker agent (dtf.workers) and the read model
(dtf.projections) into processes."""

from __future__ import annotations

import click

from dtf import __version__
from dtf.cli import (
    commands_analysis, commands_creds, commands_dashboard, commands_metrics, commands_query, commands_results, commands_run,
    commands_submit,
)
from dtf.cli.common import setup_logging


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dtf")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")
def main(verbose: bool) -> None:
    """dtf: distributed tests, benchmarks and commands over NATS JetStream."""
    setup_logging(verbose)


for module in (commands_run, commands_submit, commands_query, commands_results, commands_analysis,
               commands_dashboard, commands_metrics, commands_creds):
    for command in module.COMMANDS:
        main.add_command(command)
