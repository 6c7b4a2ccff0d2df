"""Observability (#6): the `--metrics-port` option of the services, and `dtf grafana`, a Grafana
dashboard generated from the metric declarations, so every panel names a metric some process serves.

    coordinator   dtf/cli/coordinator_metrics.py   tasks, queue, workers, slots, fold lag, decisions
    projector     dtf.projections.metrics          events consumed, lag, detections, latency histograms
    worker        dtf.workers.metrics              slots, running, pending assignments, attempt times
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import click

from dtf.cli.common import CliError
from dtf.metrics import Endpoint, Metric, parse_address

log = logging.getLogger("dtf.metrics")



def groups() -> tuple[tuple[str, tuple[Metric, ...]], ...]:
    """Every process's metrics, in dashboard order: the one list `dtf grafana` draws panels from.
    (Imported here, not at the top: every `dtf` command loads this module, few need the agent.)"""
    from dtf.cli import coordinator_metrics
    from dtf.projections import metrics as projector_metrics
    from dtf.workers import metrics as worker_metrics

    return (
        ("Coordinator", coordinator_metrics.METRICS),
        ("Projector", projector_metrics.METRICS),
        ("Workers", worker_metrics.METRICS),
    )


DASHBOARD_UID = "dtf-overview"
SCHEMA_VERSION = 39
"""Grafana's dashboard JSON model version (Grafana 10.4 / 11); Grafana migrates older ones on import."""
PANEL_W, PANEL_H, GRID_W = 12, 8, 24
QUANTILES = (0.5, 0.95)


class _Address(click.ParamType):
    name = "[HOST:]PORT"

    def convert(self, value, param, ctx):  # noqa: ANN001 - click's signature
        if isinstance(value, tuple):
            return value
        try:
            return parse_address(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def metrics_option(func: Callable) -> Callable:
    """`--metrics-port [HOST:]PORT` (or $DTF_METRICS_PORT): serve Prometheus /metrics there; a bare
    port binds 127.0.0.1, port 0 picks a free one (the URL is logged)."""
    return click.option(
        "--metrics-port", "metrics_address", type=_Address(), envvar="DTF_METRICS_PORT", default=None,
        help="Serve Prometheus metrics on [HOST:]PORT/metrics (bare port: 127.0.0.1; 0 picks one).",
    )(func)


@contextlib.contextmanager
def metrics_endpoint(address: tuple[str, int] | None, process: str) -> Iterator[Endpoint | None]:
    """The /metrics server for the life of a service process (None when not asked for one)."""
    if address is None:
        yield None
        return
    host, port = address
    try:
        endpoint = Endpoint(host, port)
    except OSError as exc:
        raise CliError(f"cannot serve metrics on {host}:{port}: {exc.strerror or exc}") from None
    log.info("%s metrics on %s", process, endpoint.url)
    try:
        yield endpoint
    finally:
        endpoint.close()


# --- the Grafana dashboard ------------------------------------------------------------------------


def _by(metric: Metric) -> str:
    return f" by ({', '.join(metric.labels)})" if metric.labels else ""


def _legend(metric: Metric) -> str:
    return " ".join("{{" + label + "}}" for label in metric.labels) or metric.name


def panel_queries(metric: Metric) -> list[tuple[str, list[dict], str]]:
    """(title, targets, unit) of each panel that shows `metric`. Gauges as they are, counters as
    rates, histograms as quantiles and as a rate of observations; series of several processes
    combined by the metric's `aggregate` (max for replicas of one truth, sum for shares)."""
    agg, by = metric.aggregate, _by(metric)
    title = metric.help.rstrip(".")
    if metric.kind == "gauge":
        return [(title, [_target("A", f"{agg}{by} ({metric.name})", _legend(metric))], metric.unit)]
    if metric.kind == "counter":
        rate = f"{agg}{by} (rate({metric.name}_total[$__rate_interval]))"
        return [(f"{title} (per second)", [_target("A", rate, _legend(metric))], "ops")]
    labels = [label for label in metric.labels if label != "worker_id"]  # one curve per type, not per worker
    keep = ", ".join(["le", *labels])
    quantiles = [
        _target(chr(ord("A") + i), f"histogram_quantile({q}, {agg} by ({keep}) "
                f"(rate({metric.name}_bucket[$__rate_interval])))",
                f"p{round(q * 100)} " + " ".join("{{" + label + "}}" for label in labels))
        for i, q in enumerate(QUANTILES)
    ]
    count_by = f" by ({', '.join(metric.labels)})" if metric.labels else ""
    observed = f"{agg}{count_by} (rate({metric.name}_count[$__rate_interval]))"
    return [
        (f"{title} (p50, p95)", quantiles, metric.unit),
        (f"{title} (per second)", [_target("A", observed, _legend(metric))], "ops"),
    ]


def _target(ref: str, expr: str, legend: str) -> dict:
    return {"refId": ref, "expr": expr, "legendFormat": legend, "range": True,
            "datasource": {"type": "prometheus", "uid": "${datasource}"}}


def dashboard() -> dict:
    """The Grafana dashboard model: a row per process, two panels abreast below it."""
    panels: list[dict] = []
    y = 0
    for title, metrics in groups():
        panels.append({"id": len(panels) + 1, "type": "row", "title": title, "collapsed": False, "panels": [],
                       "gridPos": {"h": 1, "w": GRID_W, "x": 0, "y": y}})
        y += 1
        shown = [query for metric in metrics for query in panel_queries(metric)]
        for i, (panel_title, targets, unit) in enumerate(shown):
            panels.append({
                "id": len(panels) + 1, "type": "timeseries", "title": panel_title,
                "datasource": {"type": "prometheus", "uid": "${datasource}"},
                "gridPos": {"h": PANEL_H, "w": PANEL_W, "x": (i % 2) * PANEL_W, "y": y + (i // 2) * PANEL_H},
                "targets": targets,
                "fieldConfig": {"defaults": {"unit": unit, "min": 0}, "overrides": []},
                "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                            "tooltip": {"mode": "multi", "sort": "desc"}},
            })
        y += (len(shown) + 1) // 2 * PANEL_H
    return {
        "uid": DASHBOARD_UID, "title": "dtf",
        "description": "dtf: tasks, workers, the read model (dtf grafana)",
        "tags": ["dtf"], "timezone": "browser", "editable": True, "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION, "version": 1, "refresh": "10s",
        "time": {"from": "now-1h", "to": "now"}, "timepicker": {},
        "annotations": {"list": []}, "links": [],
        "templating": {"list": [{
            "name": "datasource", "label": "Prometheus", "type": "datasource", "query": "prometheus",
            "current": {}, "hide": 0, "refresh": 1, "regex": "", "options": [],
            "includeAll": False, "multi": False,
        }]},
        "panels": panels,
    }


@click.command()
@click.option("--out", "out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the dashboard JSON here (default: stdout).")
def grafana(out: Path | None) -> None:
    """Write a Grafana dashboard (JSON model) over dtf's Prometheus metrics; import it in Grafana
    (Dashboards > New > Import) and pick the Prometheus data source that scrapes dtf."""
    text = json.dumps(dashboard(), indent=2) + "\n"
    if out is None:
        click.echo(text, nl=False)
        return
    try:
        out.write_text(text)
    except OSError as exc:
        raise CliError(f"cannot write {out}: {exc.strerror or exc}") from None
    click.echo(f"dtf: wrote the Grafana dashboard to {out}", err=True)


COMMANDS: list[click.Command] = [grafana]
