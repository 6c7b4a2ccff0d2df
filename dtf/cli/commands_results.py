"""Results, aggregation, flaky tests and CI reports (#5): `dtf results`, `dtf flaky`, `dtf report`, and
what `dtf submit --wait --junit/--fail-on-regression` writes. All of it asks the projector, which owns
the read model (`dtf.projections.aggregate`, `flaky`, `report`)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import click
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from rich.console import Console
from rich.table import Table

from dtf import subjects
from dtf.cli import submit as sub
from dtf.cli.commands_query import QUERY_TIMEOUT_S, ask, cell, query
from dtf.cli.common import CliError, connected, nats_options, query_scope
from dtf.projections import aggregate, report, report_html, report_junit
from dtf.state import TaskState

EXIT_REGRESSION = 4
"""`--fail-on-regression`: the run brought a regression (and nothing failed, which exits 1 first)."""
CATCH_UP_S = 30.0
"""How long a report waits for the projector to hold the settled run the event log already shows."""
REGRESSION_WAIT_S = 10.0
"""How long `--fail-on-regression` gives the detector to judge a settled run's results."""
POLL_S = 0.25
RESULT_COLUMNS = ["run_id", "task_id", "attempt", "worker_id", "nodeid", "outcome", "duration_s"]

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*\Z")
_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(text: str, hint: str) -> float:
    """`90s`, `30m`, `2h`, `7d`, `2w` in seconds."""
    found = _DURATION.match(text)
    if not found:
        raise click.BadParameter(f"{text!r} is not a duration (90s, 30m, 2h, 7d, 2w)", param_hint=hint)
    return float(found.group(1)) * _SECONDS[found.group(2)]


def parse_time(text: str, now: datetime, hint: str) -> datetime:
    """An ISO-8601 time (UTC when it has no offset), or a duration back from now (`7d`)."""
    if _DURATION.match(text):
        return now - timedelta(seconds=parse_duration(text, hint))
    try:
        when = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter(f"{text!r} is neither an ISO-8601 time nor a duration like 7d",
                                 param_hint=hint) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def parse_group_by(values: tuple[str, ...]) -> list[str]:
    keys = [key.strip() for value in values for key in value.split(",") if key.strip()]
    for key in keys:
        if key not in aggregate.KEYS and not (key.startswith("label.") and len(key) > len("label.")
                                              and not set(key) & set('"\\')):
            raise click.BadParameter(f"{key!r}: group by {', '.join(aggregate.KEYS)} or label.NAME",
                                     param_hint="--group-by")
    return keys


def flat(row: dict) -> dict:
    """A row for CSV/Parquet: nested values (label sets) as JSON text."""
    return {k: json.dumps(v, sort_keys=True) if isinstance(v, (dict, list)) else v for k, v in row.items()}


def write_rows(rows: list[dict], csv: bool, parquet: Path | None) -> None:
    import polars as pl

    frame = pl.DataFrame([flat(row) for row in rows], infer_schema_length=None)
    if parquet is not None:
        frame.write_parquet(parquet)
    if csv:
        click.echo(frame.write_csv(), nl=False)


PERCENT = ("pass_rate", "change", "pass_rate_change", "flip_rate")


def show_cell(row: dict, column: str) -> str:
    value = row.get(column)
    if column in PERCENT and isinstance(value, float):
        return f"{value:+.1%}" if column.endswith("change") else f"{value:.1%}"
    return cell(value)


def show_table(title: str, columns: list[str], rows: list[dict]) -> None:
    table = Table(title=title)
    for column in columns:
        table.add_column(column)
    for row in rows:
        table.add_row(*(show_cell(row, column) for column in columns))
    Console(width=None if sys.stdout.isatty() else 200).print(table)


def aggregate_columns(keys: list[str], kind: str, rows: list[dict]) -> list[str]:
    windowed = ["window_start"] if rows and "window_start" in rows[0] else []
    stats = ["mean", "median", "p95", "stddev", "change"]
    if kind == "tests":
        return [*keys, *windowed, "count", "passed", "failed", "skipped", "errors", "pass_rate", *stats]
    return [*keys, *windowed, "series", "count", *stats]


PROJECT = click.option("--project", metavar="NAME",
                       help="Only tasks submitted under this project (submit --project; default the submitter).")


@click.command()
@click.option("--run", "run_id", metavar="RUN_ID", help="Only this run.")
@PROJECT
@click.option("--group-by", "group_by", multiple=True, metavar="KEYS",
              help="Aggregate, grouped by these comma-separated keys: hardware, worker, type, test, "
                   "benchmark, metric, commit, branch, run, labels, label.NAME.")
@click.option("--metric", metavar="NAME", help="Aggregate this benchmark metric.")
@click.option("--kind", type=click.Choice(["tests", "metrics"]),
              help="Aggregate tests or metrics (default: metrics when a metric or benchmark is involved).")
@click.option("--since", metavar="T", help="Aggregate from T (ISO-8601, or back from now: 7d, 12h), compared "
                                            "with the window of the same length before it.")
@click.option("--until", metavar="T", help="Aggregate up to T (ISO-8601 or back from now).")
@click.option("--window", metavar="D", help="Aggregate per window of this length (1h, 1d, 1w), each compared "
                                             "with the one before.")
@click.option("--json", "as_json", is_flag=True, help='Print {"results": [...]} on stdout.')
@click.option("--csv", "as_csv", is_flag=True, help="Print CSV on stdout.")
@click.option("--parquet", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
              help="Write the rows to a Parquet file.")
@nats_options
def results(run_id: str | None, project: str | None, group_by: tuple[str, ...], metric: str | None,
            kind: str | None, since: str | None, until: str | None, window: str | None, as_json: bool, as_csv: bool,
            parquet: Path | None, nats_url: str | None, creds: str | None) -> None:
    """List per-test results, or aggregate them (--group-by, --metric, --since, --window): count, pass
    rate, mean, median, p95, stddev and the change against the previous window."""
    if as_json and as_csv:
        raise click.UsageError("give --json or --csv, not both")
    now = datetime.now(UTC)
    aggregating = bool(group_by or metric or kind or since or until or window)
    request: dict = {k: v for k, v in (("run_id", run_id), ("project", project)) if v}
    if aggregating:
        request |= {"group_by": parse_group_by(group_by), "kind": kind, "metric": metric,
                    "since": parse_time(since, now, "--since").isoformat() if since else None,
                    "until": parse_time(until, now, "--until").isoformat() if until else None,
                    "window_s": parse_duration(window, "--window") if window else None}
        request = {k: v for k, v in request.items() if v is not None}
    rows = query("aggregate" if aggregating else "results", request, nats_url, creds)
    if as_csv or parquet is not None:
        write_rows(rows, as_csv, parquet)
        if as_csv:
            return
    if as_json:
        click.echo(json.dumps({"results": rows}))
        return
    if aggregating:
        keys = request["group_by"]
        chosen = aggregate.kind_of(aggregate.AggregateRequest(group_by=keys, kind=kind, metric=metric))
        show_table(f"{chosen} by {', '.join(keys) or 'all'}", aggregate_columns(keys, chosen, rows), rows)
    else:
        show_table("results", RESULT_COLUMNS, rows)


@click.command()
@click.option("--since", metavar="T", help="Only results from T on (ISO-8601, or back from now: 30d).")
@click.option("--branch", metavar="NAME", help="Only runs submitted from this branch.")
@PROJECT
@click.option("--json", "as_json", is_flag=True, help='Print {"flaky": [...]} on stdout.')
@nats_options
def flaky(since: str | None, branch: str | None, project: str | None, as_json: bool, nats_url: str | None,
          creds: str | None) -> None:
    """Tests that both passed and failed on the same commit and hardware, most flip-prone first."""
    request = {k: v for k, v in (("since", parse_time(since, datetime.now(UTC), "--since").isoformat()
                                  if since else None), ("branch", branch), ("project", project)) if v is not None}
    rows = query("flaky", request, nats_url, creds)
    if as_json:
        click.echo(json.dumps({"flaky": rows}))
        return
    shown = [{**row, "commit": row["commit"][:12]} for row in rows]
    columns = ["test", "commit", "hardware", "runs", "passed", "failed", "flips", "flip_rate"]
    show_table("flaky tests", columns, shown)


# --- reports ----------------------------------------------------------------------------------------


async def detections(nc, run_id: str) -> list[dict] | None:
    """The anomalies query's findings for the run; None when no detector's read model answers (the
    rest of a report does not depend on it)."""
    try:
        await nc.request(subjects.query("anomalies", query_scope(nc)), b'{"limit": 1}', timeout=QUERY_TIMEOUT_S)
        return await ask(nc, "anomalies", {"run_id": run_id})
    except (NoRespondersError, NatsTimeout):
        return None
    except CliError as exc:
        click.echo(f"dtf: no regressions known: {exc.format_message()}", err=True)
        return None


async def caught_up(nc, run_id: str, settled: dict[str, str]) -> bool:
    """Wait until the read model shows each of the run's tasks in the state the event log gave it
    (`settled`: task id -> status); False if it has not after CATCH_UP_S."""
    deadline = asyncio.get_running_loop().time() + CATCH_UP_S
    while True:
        shown = {t["task_id"]: t["state"] for t in await ask(nc, "tasks", {"run_id": run_id})}
        if shown == settled:
            return True
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(POLL_S)


async def run_document(nc, run_id: str, settled: dict[str, str] | None, wait_regressions: bool) -> dict:
    """The report of a run from the read model. With `settled` (the run's task states from the event
    log), first wait for the projector to hold them; with `wait_regressions`, give the detector
    REGRESSION_WAIT_S to find a regression before saying there is none."""
    if settled is not None and not await caught_up(nc, run_id, settled):
        click.echo(f"dtf: the read model has not caught up with run {run_id}; reporting what it has",
                   err=True)
    tasks = await ask(nc, "tasks", {"run_id": run_id})
    if not tasks:
        raise CliError(f"no run {run_id} in the read model")
    results_rows = await ask(nc, "results", {"run_id": run_id})
    metrics = await ask(nc, "aggregate",
                        {"run_id": run_id, "kind": "metrics", "group_by": report.METRIC_GROUPS})
    found = await detections(nc, run_id)
    deadline = asyncio.get_running_loop().time() + REGRESSION_WAIT_S
    while (wait_regressions and found is not None and asyncio.get_running_loop().time() < deadline
           and not any(a.get("kind") == "regression" for a in found)):
        await asyncio.sleep(POLL_S * 4)
        found = await detections(nc, run_id)
    return report.document(run_id, tasks, results_rows, metrics, found)


def render(doc: dict, fmt: str) -> bytes:
    if fmt == "junit":
        return report_junit.to_junit(doc)
    if fmt == "html":
        return report_html.to_html(doc).encode()
    if fmt == "md":
        return report.to_markdown(doc).encode()
    return report.to_json(doc).encode()


def write_out(data: bytes, out: str) -> None:
    if out == "-":
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
        return
    try:
        Path(out).write_bytes(data)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc}") from None


def step_summary(doc: dict) -> None:
    """Append the Markdown report to GitHub's job summary when running in GitHub Actions."""
    path = os.environ.get("GITHUB_STEP_SUMMARY")
    if not path:
        return
    try:
        with open(path, "a", encoding="utf-8") as summary:
            summary.write(report.to_markdown(doc))
    except OSError as exc:
        click.echo(f"dtf: cannot append to $GITHUB_STEP_SUMMARY ({path}): {exc}", err=True)


def regression_exit(doc: dict, fail_on_regression: bool) -> int:
    """EXIT_REGRESSION when asked to fail on one and the run brought one; usage error when it cannot
    be known (no detector answers)."""
    if not fail_on_regression:
        return 0
    if doc["anomalies"] is None:
        raise CliError("--fail-on-regression: no detector answered the anomalies query (is the projector "
                       "running with detection?)")
    found = report.regressions(doc)
    for anomaly in found:
        click.echo(f"dtf: regression in {anomaly.get('series')}: {anomaly.get('before')} -> "
                   f"{anomaly.get('after')}", err=True)
    return EXIT_REGRESSION if found else 0


FAIL_ON_REGRESSION = click.option(
    "--fail-on-regression", is_flag=True,
    help=f"Exit {EXIT_REGRESSION} when the run brought a regression (waits up to {REGRESSION_WAIT_S:g}s "
         "for the detector).")


@click.command("report")
@click.option("--run", "run_id", metavar="RUN_ID", help="The run (default: the latest).")
@click.option("--format", "fmt", type=click.Choice(["junit", "json", "md", "html"]), default="md",
              show_default=True)
@click.option("--out", default="-", metavar="FILE", show_default=True,
              help="Where to write it (- is stdout).")
@FAIL_ON_REGRESSION
@nats_options
@click.pass_context
def report_command(ctx: click.Context, run_id: str | None, fmt: str, out: str, fail_on_regression: bool,
                   nats_url: str | None, creds: str | None) -> None:
    """A run's report for CI: JUnit XML, JSON, Markdown (also appended to $GITHUB_STEP_SUMMARY when set)
    or a self-contained HTML page."""
    if run_id is not None and not subjects.is_token(run_id):
        raise click.BadParameter("not a run id", param_hint="--run")

    async def main() -> dict:
        async with connected(nats_url, creds, "dtf-report") as nc:
            chosen = run_id
            if chosen is None:
                known = await ask(nc, "runs", {"limit": 1})
                if not known:
                    raise CliError("no runs in the read model yet")
                chosen = known[0]["run_id"]
            fold, _ = await sub.read_run(nc.jetstream(), chosen, query_scope(nc))
            # A settled run is reported once the read model holds all of it; one still going, as it is.
            done = fold.tasks and all(t.terminal for t in fold.tasks.values())
            settled = {t.task_id: t.status for t in fold.tasks.values()} if done else None
            return await run_document(nc, chosen, settled, fail_on_regression)

    doc = asyncio.run(main())
    write_out(render(doc, fmt), out)
    if fmt == "md":
        step_summary(doc)
    ctx.exit(regression_exit(doc, fail_on_regression))


def _remember(ctx: click.Context, param: click.Parameter, value: object) -> object:
    ctx.meta[f"dtf.ci.{param.name}"] = value
    return value


def ci_options(command):
    """`--junit FILE` and `--fail-on-regression` for `dtf submit --wait`. Kept in the context's meta
    rather than as parameters, so the submit command's long signature stays as it is;
    `after_wait` reads them back."""
    command = click.option("--junit", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE",
                           expose_value=False, callback=_remember,
                           help="Once the run settled, write its JUnit XML report here.")(command)
    return click.option("--fail-on-regression", is_flag=True, expose_value=False, callback=_remember,
                        help=f"Once the run settled, exit {EXIT_REGRESSION} if it brought a regression and "
                             "nothing failed.")(command)


def require_wait(ctx: click.Context, wait: bool) -> None:
    """`submit` without --wait has no settled run to report on."""
    for name, flag in (("junit", "--junit"), ("fail_on_regression", "--fail-on-regression")):
        if ctx.meta.get(f"dtf.ci.{name}") and not wait:
            raise click.UsageError(f"{flag} needs --wait")


async def after_wait(ctx: click.Context, nc, run_id: str, tasks: list[TaskState], exit_code: int) -> int:
    """What `dtf submit --wait` adds for CI once the run settled: the JUnit file (--junit), the job
    summary ($GITHUB_STEP_SUMMARY), and exit 4 for a regression when nothing failed
    (--fail-on-regression). Returns the exit code."""
    junit = ctx.meta.get("dtf.ci.junit")
    fail_on_regression = bool(ctx.meta.get("dtf.ci.fail_on_regression"))
    if junit is None and not fail_on_regression and not os.environ.get("GITHUB_STEP_SUMMARY"):
        return exit_code
    settled = {t.task_id: t.status for t in tasks}
    try:
        doc = await run_document(nc, run_id, settled, fail_on_regression and exit_code == 0)
    except CliError as exc:
        if junit is not None or fail_on_regression:
            raise
        # Only the job summary was wanted (Actions sets the variable for every step): the run's own
        # verdict stands without it.
        click.echo(f"dtf: no job summary: {exc.format_message()}", err=True)
        return exit_code
    if junit is not None:
        write_out(report_junit.to_junit(doc), str(junit))
    step_summary(doc)
    if exit_code != 0:
        return exit_code
    return regression_exit(doc, fail_on_regression) or exit_code


COMMANDS: list[click.Command] = [results, flaky, report_command]
