"""The live Panel dashboard (#6): `dtf dashboard`."""

from __future__ import annotations

import asyncio
import logging

import click
from nats.aio.client import Client

from dtf import events as ev
from dtf.cli.common import EXIT_PERMISSION, CliError, credential_identity, nats_options, serve_with_nats
from dtf.state import TaskState, WorkerState
from dtf.streams.cluster import free_port

DEFAULT_PORT = 8050
DASHBOARD_ROLES = ("viewer", "admin")
"""The roles the server lets read both streams, as the dashboard does."""


def detector_series(task: TaskState, worker: WorkerState | None, result: ev.ResultReported) -> list[tuple[str, float]]:
    """A result's benchmark series named as the detector names them (`BENCHMARK:METRIC{k=v}@HARDWARE`),
    so the dashboard's trends and the detections agree; the same rule as `detector.Results`."""
    from dtf.projections.detection import points
    from dtf.projections.detector import benchmark_name

    hardware = list(worker.capabilities.hardware) if worker is not None and worker.registered_at else []
    return [(key.name, point.value) for key, failures, point in points(result, benchmark_name(task), hardware, [])
            if not failures]


@click.command()
@nats_options
@click.option("--port", default=DEFAULT_PORT, show_default=True, type=click.IntRange(0, 65535),
              help="HTTP port (0 picks a free one).")
@click.option("--listen", default="127.0.0.1", show_default=True, metavar="HOST", help="Address to bind.")
@click.option("--allow-origin", "origins", multiple=True, metavar="HOST:PORT",
              help="Host a browser may reach the page under (default: the --listen address and localhost).")
def dashboard(nats_url: str | None, creds: str | None, port: int, listen: str, origins: tuple[str, ...]) -> None:
    """Serve the live dashboard: workers, queue, timeline, results, trends, alerts, replay."""
    from dtf.projections import detection, detector  # noqa: F401 - loaded now, not on the loop at the first result
    from dtf.projections.forecast import forecast
    from dtf.ui.app import serve

    identity = credential_identity(creds)
    if identity is not None and identity.role not in DASHBOARD_ROLES:  # the server would refuse its reads forever
        raise CliError(f"{creds} are {identity.role} {identity.name}'s credentials; the dashboard shows the whole "
                       f"fleet and every run: give it viewer credentials (dtf creds add --role viewer)",
                       EXIT_PERMISSION)
    port = port or free_port(listen)
    for noisy in ("tornado.access", "bokeh.server"):  # a line per HTTP request and per tab otherwise
        logging.getLogger(noisy).setLevel(logging.WARNING)
    click.echo(f"dtf dashboard: http://{listen}:{port}/", err=True)

    async def body(nc: Client, stop: asyncio.Event) -> None:
        await serve(nc, stop, port=port, address=listen, origins=list(origins), series_of=detector_series,
                    forecaster=forecast)

    serve_with_nats(nats_url, creds, "dtf-dashboard", body)


COMMANDS = [dashboard]
