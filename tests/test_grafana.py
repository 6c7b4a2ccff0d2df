"""`dtf grafana`: a dashboard model Grafana can import, whose every query (parsed as PromQL) names a
metric that a running system's /metrics endpoints really serve, and that a real Prometheus scraping
that system answers with data."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from itertools import combinations
from pathlib import Path

import promql_parser
import pytest
from click.testing import CliRunner
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import dashboard as sdk_dashboard
from grafana_foundation_sdk.models import prometheus, timeseries
from test_end_to_end import Up, free_port
from test_metrics import metrics_urls, scrape

from dtf.cli import main
from dtf.cli.commands_metrics import groups

SETTLE_WAIT_S = 120
PROMETHEUS = shutil.which("prometheus")


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
    assert (variable["name"], variable["type"], variable["query"]) == \
        ("datasource", "datasource", "prometheus")
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    rows = [p["title"] for p in dashboard["panels"] if p["type"] == "row"]
    assert rows == ["Coordinator", "Projector", "Workers"]
    for panel in panels(dashboard):
        assert panel["type"] == "timeseries" and panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in panel["targets"]]
        assert refs and len(refs) == len(set(refs))
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"] and target["expr"]


def kept(ours, theirs, path: str = "") -> list[str]:
    """Where `theirs` (ours decoded into Grafana's types and encoded again) lost or changed something
    of ours: a key Grafana's schema does not know is dropped on decoding."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [
            lost for key, value in ours.items()
            for lost in (kept(value, theirs[key], f"{path}.{key}") if key in theirs else [f"{path}.{key}"])
        ]
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        pairs = enumerate(zip(ours, theirs, strict=True))
        return [lost for i, (a, b) in pairs for lost in kept(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: {ours!r} became {theirs!r}"]


def round_trip(model, data: dict) -> dict:  # noqa: ANN001 - a grafana_foundation_sdk model class
    return json.loads(JSONEncoder().encode(model.from_json(data)))


def test_the_dashboard_round_trips_through_grafanas_own_schema_types(dashboard):
    """grafana-foundation-sdk's types are generated from Grafana's schemas (dashboard, the timeseries
    panel's options, the Prometheus query)."""
    assert kept(dashboard, round_trip(sdk_dashboard.Dashboard, dashboard)) == []
    for panel in panels(dashboard):
        assert kept(panel["options"], round_trip(timeseries.Options, panel["options"])) == []
        for target in panel["targets"]:
            assert kept(target, round_trip(prometheus.Dataquery, target)) == []
    misspelled = {**dashboard, "schemaversion": 39}
    assert kept(misspelled, round_trip(sdk_dashboard.Dashboard, misspelled)) == [".schemaversion"]


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


@pytest.fixture(scope="module")
def running(tmp_path_factory):
    """A `dtf up` with metrics on, that has run one task and holds one it cannot place."""
    base = tmp_path_factory.mktemp("system")
    up = Up(base / "d", base / "state", workers=1)
    up.env["DTF_METRICS_PORT"] = "0"
    up.start()
    try:
        assert up.dtf("submit", "--command", "true", "--wait").returncode == 0
        assert up.dtf("submit", "--command", "true", "--requires", "hardware=cuda").returncode == 0
        yield up
    finally:
        assert up.stop() == 0


def until(check, what: str) -> None:
    """Poll `check` (the system settles: the projector projects, Prometheus scrapes) for a while."""
    deadline = time.monotonic() + SETTLE_WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"{what} after {SETTLE_WAIT_S}s"
        time.sleep(0.5)


@pytest.mark.slow
def test_every_metric_a_panel_queries_is_served_by_a_running_system(dashboard, running):
    wanted = referenced(dashboard)

    def missing() -> set[str]:
        served = {
            name for url in metrics_urls(running).values() for name, series in scrape(url).items() if series
        }
        return wanted - served

    until(lambda: not missing(), f"not served: {missing()}")


def prometheus_query(port: int, expr: str) -> list[dict]:
    query = urllib.parse.urlencode({"query": expr.replace("$__rate_interval", "1m")})
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/query?{query}", timeout=10) as reply:
        body = json.load(reply)
    assert body["status"] == "success", (expr, body)
    return body["data"]["result"]


@pytest.mark.slow
@pytest.mark.skipif(PROMETHEUS is None, reason="needs a prometheus binary (Debian's prometheus package)")
def test_a_real_prometheus_scraping_dtf_answers_every_dashboard_query_with_data(dashboard, running, tmp_path):
    targets = [url.split("//", 1)[1].split("/", 1)[0] for url in metrics_urls(running).values()]
    config = tmp_path / "prometheus.yml"
    config.write_text(json.dumps({  # JSON is YAML
        "global": {"scrape_interval": "1s"},
        "scrape_configs": [{"job_name": "dtf", "static_configs": [{"targets": targets}]}],
    }))
    port = free_port()
    server = subprocess.Popen(
        [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=open(tmp_path / "prometheus.log", "wb"))
    try:
        until(lambda: _answers(port), "Prometheus is not answering")
        until(lambda: len(prometheus_query(port, 'up{job="dtf"} == 1')) == len(targets),
              "not every target is up")
        queries = [t["expr"] for p in panels(dashboard) for t in p["targets"]]
        until(lambda: all(prometheus_query(port, expr) for expr in queries),
              f"queries without data: {[e for e in queries if not prometheus_query(port, e)]}")
    finally:
        server.terminate()
        server.wait(timeout=30)


def _answers(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/-/ready", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def test_the_operations_guide_lists_every_metric():
    guide = (Path(__file__).resolve().parents[1] / "docs" / "OPERATIONS.md").read_text()
    missing = [m.name for _, metrics in groups() for m in metrics if f"`{m.name}" not in guide]
    assert missing == []
