"""Prometheus metrics: the pure parts from a fold, one endpoint over HTTP, and the whole system as
`dtf up --metrics-port 0` runs it, each /metrics scraped and parsed with prometheus_client's parser and
held against the read model (`dtf tasks|workers --json`) once the system is idle."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
from dtf.projections.metrics import DETECTION_TYPES
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from test_end_to_end import EXAMPLES, Up

from dtf import events as ev
from dtf.cli.coordinator_metrics import TASK_STATES, WORKER_STATES, fold_families, requirement_class
from dtf.cli.up import System
from dtf.metrics import Endpoint, on_loop, parse_address
from dtf.spec import Requirements, TaskSpec
from dtf.state import Fold

NOW = datetime(2026, 1, 1, tzinfo=UTC)
IDLE_WAIT_S = 120


def scrape(url: str) -> dict[str, dict[tuple, float]]:
    """sample name -> {sorted label pairs: value}, parsed by prometheus_client's own parser."""
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    samples: dict[str, dict[tuple, float]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def by(samples: dict[str, dict[tuple, float]], name: str, label: str) -> dict[str, float]:
    return {dict(labels)[label]: value for labels, value in samples.get(name, {}).items()}


def total(samples: dict[str, dict[tuple, float]], name: str) -> float:
    return sum(samples.get(name, {}).values())


# --- the pure parts -------------------------------------------------------------------------------


def test_a_requirement_class_names_equal_requirements_alike_and_no_requirements_as_any():
    assert requirement_class(Requirements()) == "any"
    assert requirement_class(None) == "any"
    assert requirement_class(Requirements(hardware=["rocm", "cuda"], min_cuda_compute=7.5)) == \
        requirement_class(Requirements(hardware=["cuda", "rocm"], min_cuda_compute=7.5)) == \
        "hardware=cuda|rocm,cuda_compute>=7.5"
    assert requirement_class(Requirements(tags={"rack": "b"}, gpu_count=2)) == "gpus>=2,rack=b"


def submitted(task_id: str, requirements: Requirements | None = None) -> ev.TaskSubmitted:
    spec = TaskSpec(type="command", config={"command": "true"}, requirements=requirements or Requirements())
    return ev.TaskSubmitted(run_id="r", task_id=task_id, submitter="me", spec=spec, time=NOW)


def test_fold_metrics_count_every_state_queue_only_waiting_tasks_and_busy_slots_of_serving_workers():
    fold = Fold()
    cuda = Requirements(hardware=["cuda"])
    for event in [
        ev.WorkerRegistered(worker_id="w1", host="h", pid=1, concurrency=3, time=NOW),
        ev.WorkerHeartbeat(worker_id="w1", time=NOW - timedelta(seconds=4)),
        ev.WorkerRegistered(worker_id="w2", host="h", pid=2, concurrency=5, time=NOW),
        ev.WorkerDrainRequested(worker_id="w2", time=NOW),
        submitted("a"), submitted("b"), submitted("c", cuda), submitted("d", cuda),
        ev.TaskAssigned(run_id="r", task_id="a", attempt=1, worker_id="w1", coordinator="c",
                        spec=submitted("a").spec, time=NOW),
    ]:
        fold.apply_event(event)
    busy = {worker: len(ids) for worker, ids in fold.active.items()}
    tasks, workers = list(fold.tasks.values()), list(fold.workers.values())
    families = {f.name: f for f in fold_families(tasks, workers, busy, NOW)}

    def values(name: str) -> dict[tuple, float]:
        return {tuple(s.labels.values()): s.value for s in families[name].samples}

    expected = {"pending": 3, "assigned": 1}
    assert values("dtf_tasks") == {(state,): expected.get(state, 0) for state in TASK_STATES}
    assert values("dtf_queue_depth") == {("any",): 1, ("hardware=cuda",): 2}
    assert values("dtf_slots") == {("busy",): 1, ("free",): 2}  # the draining worker's slots are not offered
    assert values("dtf_workers")[("online",)] == 2
    assert values("dtf_worker_heartbeat_age_seconds") == {("w1",): 4.0}


def test_an_address_is_a_port_or_host_and_port():
    assert parse_address("9100") == ("127.0.0.1", 9100)
    assert parse_address("0.0.0.0:0") == ("0.0.0.0", 0)
    assert parse_address("[::1]:9100") == ("::1", 9100)
    for bad in ("", "host:", "x:99999", "nine"):
        with pytest.raises(ValueError):
            parse_address(bad)


async def forty_two() -> int:
    return 42


async def broken() -> int:
    raise ConnectionError("the bus is away")


def test_a_scrape_thread_asks_the_running_loop_and_gets_none_from_a_failing_or_closed_one():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever)
    thread.start()
    try:
        assert on_loop(loop, forty_two) == 42
        assert on_loop(loop, broken) is None
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()
    assert on_loop(loop, forty_two) is None


class Constant(Collector):
    def collect(self):
        family = GaugeMetricFamily("dtf_test_answer", "A constant.", labels=["kind"])
        family.add_metric(["x"], 42)
        yield family


def test_an_endpoint_on_port_0_serves_its_collectors_and_the_process_over_http():
    endpoint = Endpoint("127.0.0.1", 0)
    try:
        endpoint.add(Constant())
        samples = scrape(endpoint.url)
    finally:
        endpoint.close()
    assert samples["dtf_test_answer"] == {(("kind", "x"),): 42}
    assert total(samples, "process_resident_memory_bytes") > 0


def test_dtf_up_gives_each_child_its_own_metrics_port_and_keeps_it(tmp_path):
    system = System(data_dir=tmp_path, workers=2, metrics_port=9100)
    assert system.metrics_ports() == {
        "coordinator": 9100, "projector": 9101, "worker-1": 9102, "worker-2": 9103}
    assert system.metrics_urls["worker-2"] == "http://127.0.0.1:9103/metrics"
    free = System(data_dir=tmp_path, workers=2, metrics_port=0)
    ports = free.metrics_ports()
    assert len(set(ports.values())) == 4 and 0 not in ports.values()
    assert free.metrics_ports() == ports  # a restarted child gets the port it had
    assert System(data_dir=tmp_path).metrics_urls == {}


# --- the whole system -----------------------------------------------------------------------------


@pytest.fixture
def metered(tmp_path):
    system = Up(tmp_path / "d", tmp_path / "state", workers=2)
    system.env["DTF_METRICS_PORT"] = "0"
    system.start()
    yield system
    if system.process.poll() is None:
        assert system.stop() == 0


def metrics_urls(up: Up) -> dict[str, str]:
    return json.loads((up.data_dir / "context.json").read_text())["metrics"]


def scrape_when_idle(up: Up, urls: dict[str, str]) -> dict[str, dict[str, dict[tuple, float]]]:
    """Scrape every process until nothing is left to fold, project or run, and the coordinator and
    the projector have seen the same log."""
    deadline = time.monotonic() + IDLE_WAIT_S
    while True:
        scraped = {name: scrape(url) for name, url in urls.items()}
        coordinator, projector = scraped["coordinator"], scraped["projector"]
        idle = (
            "dtf_coordinator_lag_events" in coordinator
            and total(coordinator, "dtf_coordinator_lag_events") == 0
            and by(projector, "dtf_projector_lag_events", "stream") == {"DTF_EVENTS": 0, "DTF_HEARTBEATS": 0}
            and by(projector, "dtf_projector_checkpoint", "stream")["DTF_EVENTS"]
            == total(coordinator, "dtf_coordinator_folded_seq")
            and all(total(scraped[w], "dtf_worker_running") == 0 for w in urls if w.startswith("worker"))
        )
        if idle:
            return scraped
        assert time.monotonic() < deadline, f"not idle after {IDLE_WAIT_S}s: {scraped}"
        time.sleep(0.5)


@pytest.mark.slow
def test_each_process_serves_metrics_that_match_the_read_model_once_idle(metered):
    urls = metrics_urls(metered)
    assert sorted(urls) == ["coordinator", "projector", "worker-1", "worker-2"]
    assert metered.dtf("submit", str(EXAMPLES / "mixed"), "--wait").returncode == 1  # it holds a failing test
    assert metered.dtf("submit", "--command", "true", "--wait").returncode == 0
    assert metered.dtf("submit", "--command", "true", "--requires", "hardware=cuda").returncode == 0

    scraped = scrape_when_idle(metered, urls)
    tasks = json.loads(metered.dtf("tasks", "--json").stdout)["tasks"]
    workers = json.loads(metered.dtf("workers", "--json").stdout)["workers"]
    coordinator, projector = scraped["coordinator"], scraped["projector"]

    states = Counter(t["state"] for t in tasks)
    assert by(coordinator, "dtf_tasks", "state") == {s: states[s] for s in TASK_STATES}
    assert by(coordinator, "dtf_queue_depth", "requirements") == {"hardware=cuda": 1}
    worker_states = Counter(w["state"] for w in workers)
    assert by(coordinator, "dtf_workers", "state") == {s: worker_states[s] for s in WORKER_STATES}
    slots = sum(w["concurrency"] for w in workers)
    assert by(coordinator, "dtf_slots", "state") == {"busy": 0, "free": slots}
    assert total(coordinator, "dtf_coordinator_decisions_total") >= 3  # two assignments, one unschedulable

    ran = [t for t in tasks if t["duration_s"] is not None]
    assert by(projector, "dtf_projector_events_total", "type")["TaskSubmitted"] == len(tasks) == 3
    assert by(projector, "dtf_projector_events_total", "type")["ResultReported"] == len(ran) == 2
    assert total(projector, "dtf_attempt_run_seconds_count") == len(ran)
    assert total(projector, "dtf_attempt_run_seconds_sum") == pytest.approx(sum(t["duration_s"] for t in ran))
    assert by(projector, "dtf_attempt_run_seconds_count", "type") == {"test": 1, "command": 1}
    assert total(projector, "dtf_task_wait_seconds_count") == len(ran)
    assert by(projector, "dtf_detections_total", "type") == {name: 0 for name in DETECTION_TYPES}

    for worker in workers:
        name = f"worker-{worker['worker_id'].rsplit('-', 1)[1]}"
        mine = scraped[name]
        assert by(mine, "dtf_worker_concurrency", "worker_id") == {worker["worker_id"]: worker["concurrency"]}
        assert by(mine, "dtf_worker_pending_assignments", "worker_id") == {worker["worker_id"]: 0}
    attempts = [total(scraped[w], "dtf_worker_attempt_seconds_count") for w in urls if w.startswith("worker")]
    assert sum(attempts) == sum(t["attempts"] for t in tasks) == 2


def test_a_taken_metrics_port_is_a_one_line_usage_error(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "dtf", "coordinator", "--nats", "nats://127.0.0.1:1",
             "--metrics-port", str(port)],
            capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines()[-1].startswith(f"dtf: cannot serve metrics on 127.0.0.1:{port}")
