"""Online detection and forecasts (#5): `dtf detector`, `dtf anomalies`, `dtf forecast`."""

from __future__ import annotations

import asyncio
import contextlib
import json

import click
from nats.aio.client import Client
from rich.console import Console
from rich.table import Table

from dtf import subjects
from dtf.cli.commands_query import cell, query
from dtf.cli.common import CliError, connected, nats_options, parse_pairs, serve_with_nats
from dtf.streams import bus, topology


@click.command()
@click.option("--better", "better", multiple=True, metavar="METRIC=lower|higher",
              help="Which way is better for a metric, overriding its name's look (times and latencies: "
                   "lower; throughput-like names: higher). Repeatable.")
@nats_options
def detector(better: tuple[str, ...], nats_url: str | None, creds: str | None) -> None:
    """Run the detector: follow results, publish RegressionDetected / AnomalyDetected events."""
    from dtf.projections.detection import Settings
    from dtf.projections.detector import run_detector

    overrides = parse_pairs(better, "--better")
    for metric, way in overrides.items():
        if way not in ("lower", "higher"):
            raise click.BadParameter(f"{metric}={way}: say lower or higher", param_hint="--better")
    settings = Settings(better=overrides)  # type: ignore[arg-type]

    async def body(nc: Client, stop: asyncio.Event) -> None:
        await run_detector(nc, stop, settings=settings)

    serve_with_nats(nats_url, creds, "dtf-detector", body)


TEST_METRIC = "failure_rate"
"""`dtf.projections.detection.TEST_METRIC`, without importing river for a listing."""
ANOMALY_COLUMNS = ("time", "kind", "series", "owner", "before", "after", "size", "confidence", "run_id")


@click.command()
@click.option("--series", metavar="S", help="Only this series (as the listing names it).")
@click.option("--run", "run_id", metavar="RUN_ID", help="Only detections made by this run's results.")
@click.option("--kind", type=click.Choice(["regression", "anomaly"]), help="Only regressions or anomalies.")
@click.option("--project", metavar="NAME",
              help="Only detections made by results of tasks submitted under this project (submit --project).")
@click.option("--json", "as_json", is_flag=True, help='Print {"anomalies": [...]} on stdout.')
@nats_options
def anomalies(series: str | None, run_id: str | None, kind: str | None, project: str | None, as_json: bool,
              nats_url: str | None, creds: str | None) -> None:
    """List the regressions and anomalies the detector found, newest first (from the read model)."""
    request = {k: v for k, v in {"series": series, "run_id": run_id, "kind": kind, "project": project}.items() if v}
    rows = query("anomalies", request, nats_url, creds)
    if as_json:
        click.echo(json.dumps({"anomalies": rows}))
        return
    table = Table(title="anomalies")
    for column in ANOMALY_COLUMNS:
        table.add_column(column)
    for row in rows:
        # A failure rate's size is the change of the rate itself; a metric's is relative.
        size = f"{row['size']:+.2f}" if row["metric"] == TEST_METRIC else f"{row['size']:+.1%}"
        shown = {**row, "size": size}
        table.add_row(*(cell(shown.get(column)) for column in ANOMALY_COLUMNS))
    Console().print(table)


@click.command()
@click.argument("series")
@click.option("--horizon", type=click.IntRange(1, 100), default=5, show_default=True,
              help="Runs to forecast ahead.")
@click.option("--owner", metavar="SUBMITTER",
              help="Whose series of that name (needed when several submitters run it).")
@click.option("--json", "as_json", is_flag=True, help="Print the forecast as one JSON object.")
@nats_options
def forecast(series: str, horizon: int, owner: str | None, as_json: bool, nats_url: str | None,
             creds: str | None) -> None:
    """Forecast SERIES (AutoETS) and say whether its last run is outside the 95 % interval."""
    from dtf.projections import forecast as fc

    async def main() -> fc.SeriesHistory:
        from dtf.projections import artifacts

        history = fc.SeriesHistory()
        async with connected(nats_url, creds, "dtf-forecast") as nc:
            js = nc.jetstream()
            reader = bus.read(js, topology.EVENTS, [subjects.TASKS, subjects.WORKERS])
            async with contextlib.aclosing(reader) as messages:
                chunk: list[bus.StoredMsg] = []
                async for message in messages:
                    chunk.append(message)
                    if len(chunk) >= 2000 or message.pending == 0:
                        await asyncio.to_thread(history.apply, chunk, await artifacts.fetch_tests(js, chunk))
                        chunk = []
        return history

    history = asyncio.run(main())
    owners = history.series.get(series)
    if owners is None:
        near = sorted(name for name in history.series if series.lower() in name.lower())[:10]
        hint = f"; did you mean: {', '.join(near)}" if near else f" ({len(history.series)} series known)"
        raise CliError(f"no benchmark series named {series!r}{hint}")
    # Each submitter's runs of a name are a series of their own (as the detector keeps them).
    if owner is None and len(owners) > 1:
        raise CliError(f"{series} is run by several submitters ({', '.join(sorted(owners))}): "
                       "name one with --owner")
    if owner is None:
        [owner] = owners
    points = owners.get(owner)
    if points is None:
        raise CliError(f"{series}: no runs of submitter {owner!r} "
                       f"(its submitters: {', '.join(sorted(owners))})")
    try:
        result = {"series": series, "owner": owner, **fc.forecast(points, horizon)}
    except fc.NotEnoughHistory as exc:
        raise CliError(f"{series}: {exc}") from None
    if as_json:
        click.echo(json.dumps(result))
        return
    last = result["last"]
    verdict = "OUTSIDE" if last["outside"] else "inside"
    click.echo(f"{series}: {result['runs']} runs, model {result['model']}")
    click.echo(f"last run {last['run_id']}: {last['value']:.6g} is {verdict} the {result['level']} % interval "
               f"[{last['lo']:.6g}, {last['hi']:.6g}] (expected {last['expected']:.6g})")
    for step in result["forecast"]:
        click.echo(f"  +{step['step']}: {step['mean']:.6g}  [{step['lo']:.6g}, {step['hi']:.6g}]")


COMMANDS: list[click.Command] = [detector, anomalies, forecast]
