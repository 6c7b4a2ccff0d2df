"""The `dtf` command line: the composition root, the one place that wires the domain (dtf/) to the
JetStream topology (dtf.streams), the worker agent (dtf.workers) and the read model
(dtf.projections) into processes."""

from __future__ import annotations

from dtf.cli import early_signals

early_signals.hold()  # before the slow imports below: a SIGTERM now still stops a service cleanly

import click  # noqa: E402

from dtf import __version__  # noqa: E402
from dtf.cli import (  # noqa: E402
    commands_analysis, commands_creds, commands_dashboard, commands_metrics, commands_query, commands_results, commands_run,
    commands_submit,
)
from dtf.cli.common import setup_logging  # noqa: E402

SERVICES = frozenset({"up", "demo", "coordinator", "worker", "projector", "detector", "dashboard"})
"""Commands that run until a stop signal: they take over held signals in `common.serve`."""


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="dtf")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging on stderr.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """dtf: distributed tests, benchmarks and commands over NATS JetStream."""
    if ctx.invoked_subcommand not in SERVICES:
        early_signals.release()
    setup_logging(verbose)


for module in (commands_run, commands_submit, commands_query, commands_results, commands_analysis,
               commands_dashboard, commands_metrics, commands_creds):
    for command in module.COMMANDS:
        main.add_command(command)
