"""The detector service against a real nats-server: a benchmark whose metric jumps 20 % at run 20
brings exactly one RegressionDetected naming its series; a restarted detector publishes nothing
again; the finding is in the read model (the `anomalies` query, `dtf anomalies`, a rebuild) and in
`dtf replay`."""

import asyncio
import contextlib
import json
import random
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta

from dtf import events as ev
from dtf import subjects
from dtf.projections.detector import Follower, run_detector
from dtf.projections.projector import run_projector
from dtf.projections.rebuild import rebuild, tables_equal
from dtf.spec import TaskSpec
from dtf.streams import bus, topology
from test_projection_live import ask, caught_up

T0 = datetime(2025, 3, 1, tzinfo=UTC)
SPEC = TaskSpec(type="benchmark", name="resnet-bench", config={"command": "python bench.py", "model": "resnet50"})
SERIES = "resnet-bench:latency_ms{model=resnet50}@cpu"


def benchmark_runs(values: list[float]) -> list[ev.Event]:
    """One worker, then one run per value: the benchmark submitted, assigned and passed with it."""
    events: list[ev.Event] = [ev.WorkerRegistered(
        id="w1-registered", time=T0, worker_id="w1", host="bench-box", pid=1,
        capabilities=ev.Capabilities(hardware=["cpu"]),
    )]
    for n, value in enumerate(values):
        run, task, at = f"run{n:02d}", f"bench-{n:02d}", T0 + timedelta(hours=n)
        events += [
            ev.TaskSubmitted(id=f"{task}-submitted", time=at, run_id=run, task_id=task, submitter="ci", spec=SPEC),
            ev.TaskAssigned(id=f"{task}-assigned", time=at, run_id=run, task_id=task, attempt=1, worker_id="w1",
                            coordinator="c1", spec=SPEC),
            ev.ResultReported(id=f"{task}-result", time=at + timedelta(minutes=5), run_id=run, task_id=task,
                              attempt=1, worker_id="w1", outcome="passed", metrics={"latency_ms": value},
                              labels={"model": "resnet50"}),
        ]
    return events


def jump_at_20(runs: int = 30) -> list[float]:
    noise = random.Random(20)
    return [100.0 * (1.2 if n >= 20 else 1.0) * (1 + noise.gauss(0, 0.02)) for n in range(runs)]


@contextlib.asynccontextmanager
async def detector(nc):
    """A running detector; yields its follower, to see how far it got."""
    stop, follower = asyncio.Event(), Follower()
    task = asyncio.create_task(run_detector(nc, stop, follower=follower))
    try:
        yield follower
    finally:
        stop.set()
        await task


async def settled(js, follower):
    """Wait until the detector has read the whole stream, its own publications included."""
    while True:
        last = (await js.stream_info(topology.EVENTS)).state.last_seq
        if follower.last_seq >= last and not follower.due:
            return
        await asyncio.sleep(0.05)


async def detections(js) -> list[tuple[str, ev.Event]]:
    found = []
    async for message in bus.read(js, topology.EVENTS, [subjects.TASKS]):
        event = ev.decode(message.data)
        if isinstance(event, ev.Detection):
            found.append((message.subject, event))
    return found


async def dtf(nats_server, *args: str) -> str:
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "dtf", *args, "--nats", nats_server.url],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


async def test_a_20_percent_jump_at_run_20_brings_exactly_one_regression_naming_its_series(nc, js):
    await bus.publish_many(js, benchmark_runs(jump_at_20()))
    async with detector(nc) as follower:
        await settled(js, follower)

    [(subject, regression)] = await detections(js)
    assert isinstance(regression, ev.RegressionDetected)
    assert regression.series == SERIES
    assert (regression.benchmark, regression.metric, regression.hardware) == ("resnet-bench", "latency_ms", ["cpu"])
    assert regression.change_run_id == "run20"
    assert regression.result_ids[0] == "bench-20-result"
    assert 0.15 < regression.size < 0.25 and regression.after > regression.before
    assert subject == subjects.task(regression.run_id, regression.task_id, "regression", "detector")
    assert int(regression.run_id.removeprefix("run")) < 30  # found within the ten runs after the jump


async def test_a_restarted_detector_publishes_nothing_it_published_before(nc, js):
    await bus.publish_many(js, benchmark_runs(jump_at_20()))
    async with detector(nc) as follower:
        await settled(js, follower)
    stored = (await js.stream_info(topology.EVENTS)).state.last_seq

    # Every publish shows on core NATS, even one JetStream would drop as a duplicate.
    heard = []

    async def hear(msg):
        heard.append(msg.subject)

    sub = await nc.subscribe(subjects.task("*", "*", "*", subjects.DETECTOR), cb=hear)
    async with detector(nc) as follower:
        await settled(js, follower)
        await nc.flush()
    await sub.unsubscribe()

    assert heard == []
    assert (await js.stream_info(topology.EVENTS)).state.last_seq == stored
    assert follower.seen == {e.id for _, e in await detections(js)}


async def test_a_second_history_adds_its_own_detection_after_the_first_ones(nc, js):
    await bus.publish_many(js, benchmark_runs(jump_at_20()))
    async with detector(nc) as follower:
        await settled(js, follower)
        # The same benchmark on, live: it falls back 20 % from run 30 on (an improvement: not a regression)
        # and then jumps again at run 45.
        later = [v * (1 / 1.2 if 30 <= n < 45 else 1.0) for n, v in enumerate(jump_at_20(60))][30:]
        await bus.publish_many(js, benchmark_runs([0.0] * 30 + later)[1 + 3 * 30:])
        await settled(js, follower)

    found = [e for _, e in await detections(js)]
    assert [(e.change_run_id, type(e).__name__) for e in found] == [
        ("run20", "RegressionDetected"), ("run45", "RegressionDetected"),
    ]


async def test_the_regression_is_in_the_read_model_a_rebuild_and_the_replay(nats_server, nc, js, tmp_path):
    await bus.publish_many(js, benchmark_runs(jump_at_20()))
    stop = asyncio.Event()
    live = tmp_path / "live.duckdb"
    projecting = asyncio.create_task(run_projector(nc, live, stop, fetch_timeout=0.5))
    try:
        async with detector(nc) as follower:
            await settled(js, follower)
        await caught_up(nc, js)
        reply = await ask(nc, "anomalies", b'{"kind": "regression"}')
        listed = json.loads(await dtf(nats_server, "anomalies", "--json", "--series", SERIES))
        by_run = await ask(nc, "anomalies", json.dumps({"run_id": reply["anomalies"][0]["run_id"]}).encode())
        elsewhere = await ask(nc, "anomalies", b'{"run_id": "run05"}')
    finally:
        stop.set()
        await projecting

    [row] = reply["anomalies"]
    assert (row["kind"], row["series"], row["change_run_id"]) == ("regression", SERIES, "run20")
    assert row["before"] < row["after"] and 0.15 < row["size"] < 0.25 and 0 < row["confidence"] <= 1
    assert listed == {"anomalies": reply["anomalies"]}
    assert by_run["anomalies"] == reply["anomalies"] and elsewhere["anomalies"] == []

    await rebuild(js, tmp_path / "rebuilt.duckdb")
    assert tables_equal(live, tmp_path / "rebuilt.duckdb") == []

    lines = [json.loads(line) for line in (await dtf(nats_server, "replay", "--json")).splitlines()]
    assert [line["event"]["series"] for line in lines if line["event"]["type"] == "RegressionDetected"] == [SERIES]


async def test_bad_analysis_requests_get_a_clear_error(nc, js, tmp_path):
    stop = asyncio.Event()
    projecting = asyncio.create_task(run_projector(nc, tmp_path / "live.duckdb", stop, fetch_timeout=0.5))
    try:
        unknown_kind = await ask(nc, "anomalies", b'{"kind": "drift"}')
        unknown_field = await ask(nc, "anomalies", b'{"sereis": "x"}')
        empty = await ask(nc, "anomalies", b"")
    finally:
        stop.set()
        await projecting
    assert "kind" in unknown_kind["error"] and "sereis" in unknown_field["error"]
    assert empty == {"anomalies": [], "next_offset": None}


async def test_dtf_forecast_says_whether_the_last_run_is_outside_the_95_percent_interval(nats_server, js):
    values = jump_at_20()
    values[-1] *= 1.3
    await bus.publish_many(js, benchmark_runs(values))

    result = json.loads(await dtf(nats_server, "forecast", SERIES, "--horizon", "2", "--json"))
    assert (result["series"], result["runs"], result["model"]) == (SERIES, 30, "AutoETS")
    assert result["last"]["run_id"] == "run29" and result["last"]["outside"] is True
    assert len(result["forecast"]) == 2
    text = await dtf(nats_server, "forecast", SERIES)
    assert "OUTSIDE the 95 % interval" in text


async def test_dtf_forecast_names_the_series_it_knows_when_asked_for_another(nats_server, js):
    await bus.publish_many(js, benchmark_runs(jump_at_20(12)))
    done = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "dtf", "forecast", "resnet", "--nats", nats_server.url],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2 and SERIES in done.stderr


async def test_dtf_detector_runs_as_a_process_and_stops_cleanly_on_sigterm(nats_server, js):
    await bus.publish_many(js, benchmark_runs(jump_at_20()))
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dtf", "detector", "--nats", nats_server.url, "--better", "latency_ms=higher",
        stderr=subprocess.PIPE,
    )
    try:
        # Told that higher latency is better, it sees the jump as an improvement: one more run that
        # drops back 20 % is its regression.
        await bus.publish_many(js, benchmark_runs([0.0] * 30 + [100.0] * 8)[1 + 3 * 30:])
        while not await detections(js):
            await asyncio.sleep(0.1)
    finally:
        process.send_signal(signal.SIGTERM)
        _, stderr = await process.communicate()
    [(_, regression)] = await detections(js)
    assert (regression.better, regression.change_run_id) == ("higher", "run30")
    assert process.returncode == 0, stderr.decode()
