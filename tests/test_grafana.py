"""`dtf grafana`: a dashboard model Grafana can import, whose every query (parsed as PromQL) names a
metric that a running system's /metrics endpoints really serve."""

from __future__ import annotations

import json
import time
from pathlib import Path
from itertools import combinations

import promql_parser
import pytest
from click.testing import CliRunner

from dtf.cli import main
from dtf.cli.commands_metrics import groups

from test_end_to_end import Up
from test_metrics import metrics_urls, scrape

SCRAPE_WAIT_S = 120


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("grafana") / "dtf.json"
    done = CliRunner().invoke(main, ["grafana", "--out", str(out)])
    assert done.exit_code == 0, done.output
    return json.loads(out.read_text())


def panels(dashboard: dict) -> list[dict]:
    return [p for p in dashboard["panels"] if p["type"] != "row"]


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects, from its syntax tree."""
    names: set[str] = set()

    def visit(node) -> bool:  # noqa: ANN001 - a promql_parser node
        if isinstance(node, promql_parser.VectorSelector) and node.name:
            names.add(node.name)
        return True

    # $__rate_interval is Grafana's, substituted before Prometheus sees the query.
    promql_parser.walk(promql_parser.parse(expr.replace("$__rate_interval", "1m")), visit)
    return names


def referenced(dashboard: dict) -> set[str]:
    return {name for p in panels(dashboard) for t in p["targets"] for name in metric_names(t["expr"])}


def test_the_dashboard_is_an_importable_grafana_model_with_a_prometheus_datasource_variable(dashboard):
    assert isinstance(dashboard["schemaVersion"], int) and dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"] and "id" not in dashboard  # import gives it an id
    [variable] = dashboard["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert [p["title"] for p in dashboard["panels"] if p["type"] == "row"] == ["Coordinator", "Projector", "Workers"]
    for panel in panels(dashboard):
        assert panel["type"] == "timeseries" and panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"]


def test_panels_sit_on_the_24_column_grid_without_overlapping(dashboard):
    def cells(panel: dict) -> set[tuple[int, int]]:
        g = panel["gridPos"]
        assert all(isinstance(g[k], int) and g[k] >= 0 for k in "hwxy") and g["h"] > 0 and g["w"] > 0
        assert g["x"] + g["w"] <= 24
        return {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}

    for a, b in combinations(dashboard["panels"], 2):
        assert not cells(a) & cells(b), (a["title"], b["title"])


def test_every_query_parses_and_names_only_declared_metrics_and_every_metric_has_a_panel(dashboard):
    declared = {name for _, metrics in groups() for m in metrics for name in m.sample_names}
    shown = referenced(dashboard)
    assert shown <= declared
    for _, metrics in groups():
        for metric in metrics:
            assert shown & set(metric.sample_names), f"{metric.name} has no panel"


@pytest.mark.slow
def test_every_metric_a_panel_queries_is_served_by_a_running_system(dashboard, tmp_path):
    up = Up(tmp_path / "d", tmp_path / "state", workers=1)
    up.env["DTF_METRICS_PORT"] = "0"
    up.start()
    try:
        assert up.dtf("submit", "--command", "true", "--wait").returncode == 0
        assert up.dtf("submit", "--command", "true", "--requires", "hardware=cuda").returncode == 0
        wanted = referenced(dashboard)
        deadline = time.monotonic() + SCRAPE_WAIT_S
        while True:  # the projector may not have projected the result yet
            served = {name for url in metrics_urls(up).values() for name, series in scrape(url).items() if series}
            if wanted <= served or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert wanted - served == set()
    finally:
        assert up.stop() == 0


def test_the_operations_guide_lists_every_metric():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md").read_text()
    missing = [m.name for _, metrics in groups() for m in metrics if f"`{m.name}" not in guide]
    assert missing == []
