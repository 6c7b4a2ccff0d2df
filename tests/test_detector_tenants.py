"""Each tenant's detector series are its own (#13, "no role can break another"): a series is keyed by
the owner of the runs whose results it holds (the task's submitter), so another submitter's results
under the same benchmark, labels and hardware neither mask a regression nor raise an anomaly in it,
and a submitter's `dtf anomalies` lists its own findings only. Detection ids still hash the series
name alone, so a log written when series were shared keeps its ids."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf import events as ev
from dtf import subjects
from dtf.projections import queries, schema
from dtf.projections.detection import Detector
from dtf.projections.detector import Follower, run_detector
from dtf.projections.projection import Projection
from dtf.projections.projector import run_projector
from dtf.streams import bus, topology
from dtf.streams.bus import StoredMsg
from conftest import SecuredServer
from test_detector_service import SERIES, SPEC, jump_at_20, settled
from test_projection_live import caught_up

T0 = datetime(2025, 3, 1, tzinfo=UTC)
ROOT = Path(__file__).resolve().parents[1]
SOME = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def result(owner: str, n: int, value: float) -> ev.ResultReported:
    return ev.ResultReported(
        id=f"{owner}-res{n}", time=T0 + timedelta(hours=n), run_id=f"{owner}-run{n}", task_id=f"{owner}-task{n}",
        attempt=1, worker_id="w1", outcome="passed", metrics={"latency_ms": value}, labels={"model": "bert"},
    )


def detect(order: list[tuple[str, int]], values: dict[str, list[float]], shared: bool = False) -> list[ev.Detection]:
    """Feed each (owner, run index) in order; `shared` keys every result as no one's, as the detector
    did before series were per owner."""
    detector, found = Detector(), []
    for owner, n in order:
        found += detector.observe(result(owner, n, values[owner][n]), "bench", ["cpu"], [], "" if shared else owner)
    return found


def noisy(runs: int, seed: int, level: float = 100.0, noise: float = 0.02) -> list[float]:
    rng = random.Random(seed)
    return [level * (1 + rng.gauss(0, noise)) for _ in range(runs)]


def alternating(runs: int) -> list[tuple[str, int]]:
    return [(owner, n) for n in range(runs) for owner in ("alice", "bob")]


def found(detections: list[ev.Detection]) -> list[tuple[str, str, str]]:
    return [(type(d).__name__, d.owner, d.run_id) for d in detections]


# --- the pure detector --------------------------------------------------------------------------


def test_anothers_runs_at_the_level_bob_moves_to_do_not_mask_his_regression():
    values = {"bob": [v * (1.2 if n >= 20 else 1.0) for n, v in enumerate(noisy(30, 1))],
              "alice": noisy(30, 2, level=120.0)}
    # In one shared series alice's runs at 120 hide bob's 20 % slowdown: what a tenant could do to another.
    assert detect(alternating(30), values, shared=True) == []
    [regression] = detect(alternating(30), values)
    assert isinstance(regression, ev.RegressionDetected)
    assert (regression.owner, regression.change_run_id) == ("bob", "bob-run20")
    assert all(r.startswith("bob-") for r in regression.result_ids)
    assert regression.series == "bench:latency_ms{model=bert}@cpu"  # named as before: the owner is no part of it


def test_anothers_runs_raise_no_anomaly_in_bobs_series():
    values = {"alice": noisy(30, 5, level=50.0), "bob": noisy(10, 6)}
    order = [("alice", n) for n in range(10)]
    for n in range(10):  # two of alice's runs after each of bob's
        order += [("bob", n), ("alice", 10 + 2 * n), ("alice", 11 + 2 * n)]
    # Shared, every run of bob's stands out from alice's level: a false anomaly on each of his runs.
    assert {d.run_id for d in detect(order, values, shared=True)} == {f"bob-run{n}" for n in range(10)}
    assert detect(order, values) == []


alone_values = st.lists(st.floats(50, 200), min_size=0, max_size=50)


@SOME
@given(bob=alone_values, at=st.integers(0, 49), factor=st.floats(0.5, 2.0),
       alice=st.lists(st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(1, 1000)), max_size=50),
       interleave=st.randoms(use_true_random=False))
def test_each_owners_detections_are_those_it_would_get_were_it_alone(bob, at, factor, alice, interleave):
    values = {"bob": [v * factor if n >= at else v for n, v in enumerate(bob)], "alice": alice}
    order = [("bob", n) for n in range(len(bob))] + [("alice", n) for n in range(len(alice))]
    interleave.shuffle(order)
    # Each owner's runs keep their own order (a shuffle of the merge, then each sorted back in place).
    runs = {owner: iter(sorted(n for o, n in order if o == owner)) for owner in values}
    order = [(owner, next(runs[owner])) for owner, _ in order]
    mixed = detect(order, values)
    for owner in values:
        alone = detect([(o, n) for o, n in order if o == owner], values)
        mine = [d for d in mixed if d.owner == owner]
        assert [ev.encode(d) for d in mine] == [ev.encode(d) for d in alone], owner
        assert all(d.run_id.startswith(f"{owner}-") and all(r.startswith(f"{owner}-") for r in d.result_ids)
                   for d in mine)
    assert {d.owner for d in mixed} <= set(values)


def test_ids_hash_the_series_name_only_so_the_shared_series_ids_stay():
    values = {"bob": [v * (1.2 if n >= 20 else 1.0) for n, v in enumerate(noisy(30, 1))]}
    order = [("bob", n) for n in range(30)]
    [owned], [shared] = detect(order, values), detect(order, values, shared=True)
    token = hashlib.sha256(b"bench:latency_ms{model=bert}@cpu").hexdigest()[:16]
    assert owned.id == shared.id == f"regression-{token}-{owned.result_ids[-1]}"
    assert (owned.owner, shared.owner) == ("bob", "")
    assert msgspec.structs.replace(owned, owner="") == shared


# --- the service's pure half: the owner is the task's submitter; an old log replays -----------------


def two_tenants(values: dict[str, list[float]], order: list[tuple[str, int]] | None = None) -> list[ev.Event]:
    """One worker, then one benchmark run per value of each submitter, alternating (or in `order`):
    the same spec, labels and hardware, so the same series name."""
    events: list[ev.Event] = [ev.WorkerRegistered(
        id="w1-registered", time=T0, worker_id="w1", host="bench-box", pid=1,
        capabilities=ev.Capabilities(hardware=["cpu"]))]
    if order is None:
        order = [(who, n) for n in range(max(map(len, values.values()))) for who in values if n < len(values[who])]
    for step, (who, n) in enumerate(order):
        run, task, at = f"{who}-run{n:02d}", f"{who}-bench-{n:02d}", T0 + timedelta(minutes=10 * step)
        events += [
            ev.TaskSubmitted(id=f"{task}-submitted", time=at, run_id=run, task_id=task, submitter=who, spec=SPEC),
            ev.TaskAssigned(id=f"{task}-assigned", time=at, run_id=run, task_id=task, attempt=1, worker_id="w1",
                            coordinator="coordinator", spec=SPEC),
            ev.ResultReported(id=f"{task}-result", time=at + timedelta(minutes=5), run_id=run, task_id=task,
                              attempt=1, worker_id="w1", outcome="passed", metrics={"latency_ms": values[who][n]},
                              labels={"model": "resnet50"}),
        ]
    return events


def tenants_values() -> dict[str, list[float]]:
    """Bob's benchmark slows down 20 % at run 20; alice runs the same one at 120 with one outlier."""
    alice = noisy(30, 2, level=120.0)
    alice[12] *= 1.6
    return {"alice": alice, "bob": jump_at_20()}


def stored(events: list[ev.Event]) -> list[StoredMsg]:
    return [StoredMsg(topology.EVENTS, seq, subjects.subject_for(e), ev.encode(e)) for seq, e in enumerate(events, 1)]


def follow(events: list[ev.Event]) -> Follower:
    follower = Follower()
    follower.apply(stored(events), {})
    return follower


def test_the_detector_service_keys_each_result_by_its_tasks_submitter():
    due = list(follow(two_tenants(tenants_values())).due.values())
    assert [(type(d).__name__, d.owner, d.series) for d in due] == [
        ("AnomalyDetected", "alice", SERIES), ("RegressionDetected", "bob", SERIES)]
    [anomaly, regression] = due
    assert anomaly.run_id == "alice-run12" and anomaly.result_ids == ["alice-bench-12-result"]
    assert regression.change_run_id == "bob-run20"
    assert all(r.startswith("bob-") for r in regression.result_ids)


def without_owner(detection: ev.Detection) -> ev.Detection:
    """The event as a detector from before the field wrote it (no `owner` on the wire), decoded today."""
    raw = msgspec.json.decode(ev.encode(detection))
    del raw["owner"]
    old = ev.decode(msgspec.json.encode(raw))
    assert old.owner == "" and msgspec.structs.replace(old, owner=detection.owner) == detection
    return old


def test_a_log_written_when_series_were_shared_replays_without_publishing_again():
    # One submitter's runs, as most logs are: its own series finds what the shared one did, with the
    # same ids, so the old events settle what is found and nothing is due.
    events = two_tenants({"ci": jump_at_20()})
    [regression] = follow(events).due.values()
    assert regression.owner == "ci"
    assert follow([*events, without_owner(regression)]).due == {}


def test_a_shared_series_old_findings_stay_and_only_what_the_owners_series_adds_is_due_once():
    # Alice's runs at 50 first, then two of hers after each of bob's, whose benchmark slows down 20 %
    # at his run 20. The shared series saw each of bob's runs as an outlier of alice's level.
    values = {"alice": noisy(70, 5, level=50.0), "bob": jump_at_20()}
    order = [("alice", n) for n in range(10)]
    for n in range(30):
        order += [("bob", n), ("alice", 10 + 2 * n), ("alice", 11 + 2 * n)]
    events = two_tenants(values, order)
    sharing = Detector()
    legacy = [without_owner(d) for e in events if isinstance(e, ev.ResultReported)
              for d in sharing.observe(e, SPEC.name, ["cpu"], [])]
    assert legacy and all(d.run_id.startswith("bob-") for d in legacy)
    follower = follow([*events, *legacy])
    assert follower.seen == {d.id for d in legacy}  # the old events stay, settled, never published again
    [regression] = follower.due.values()  # what bob's own series finds, due once
    assert (regression.owner, regression.change_run_id) == ("bob", "bob-run20")
    assert regression.id not in follower.seen
    assert follow([*events, *legacy, regression]).due == {}  # once published, nothing is due


# --- the read model: the owner column, old databases, scoped queries ---------------------------------


def project(events: list[ev.Event]) -> Projection:
    projection = Projection.open(":memory:")
    projection.apply_batch(stored(events), {})
    return projection


def test_an_older_read_model_gets_the_owner_column_and_equals_a_rebuilt_one(tmp_path):
    events = two_tenants({"ci": jump_at_20()})
    [regression] = follow(events).due.values()
    history = [*events, without_owner(regression)]  # a detection from before owners, in an old database
    old = schema.Table("detections", tuple(c for c in schema.DETECTIONS.columns if c[0] not in schema.DETECTIONS.added))
    rebuilt = project(history).con
    path = tmp_path / "old.duckdb"
    with duckdb.connect(str(path)) as con:
        con.execute(old.ddl())
        rows = rebuilt.execute(f"SELECT {', '.join(old.column_names)} FROM detections ORDER BY ALL").fetchall()
        assert len(rows) == 1
        con.executemany(f"INSERT INTO detections VALUES ({', '.join('?' * len(old.columns))})", rows)
        schema.create(con)
        migrated = con.execute("SELECT * FROM detections ORDER BY ALL").fetchall()
    assert migrated == schema.contents(rebuilt)["detections"]
    assert migrated[0][-1] == ""


def ask(con, request: dict, party: str | None = None) -> list[dict]:
    return json.loads(queries.answer(con, "anomalies", json.dumps(request).encode(), party))["anomalies"]


def test_a_submitter_lists_its_own_series_findings_in_full_and_old_shared_ones_as_before():
    events = two_tenants(tenants_values())
    [anomaly, regression] = follow(events).due.values()
    # An old shared-series finding completed by one of bob's results, naming one of alice's runs.
    old = without_owner(msgspec.structs.replace(
        regression, id="regression-old", result_ids=["alice-bench-03-result", "bob-bench-04-result"],
        run_id="bob-run04", task_id="bob-bench-04", change_run_id="alice-run03",
        time=next(e.time for e in events if e.id == "bob-bench-04-result")))
    cur = project([*events, anomaly, regression, old]).con

    everyone = ask(cur, {})
    assert [(row["id"], row["owner"]) for row in everyone] == [
        (regression.id, "bob"), (anomaly.id, "alice"), ("regression-old", "")]
    [mine] = ask(cur, {}, "alice")
    assert (mine["id"], mine["owner"], mine["result_ids"]) == (anomaly.id, "alice", anomaly.result_ids)
    bobs = ask(cur, {}, "bob")
    assert [row["id"] for row in bobs] == [regression.id, "regression-old"]
    assert (bobs[0]["result_ids"], bobs[0]["change_run_id"]) == (regression.result_ids, "bob-run20")
    assert (bobs[1]["result_ids"], bobs[1]["change_run_id"]) == ([], None)  # alice's run, alice's result: hidden
    assert ask(cur, {"series": SERIES}, "bob") == bobs
    assert ask(cur, {"kind": "anomaly"}, "bob") == []


# --- end to end: the detector and projector with their own credentials, each submitter's CLI ---------


@pytest.fixture
def tenants_server(tmp_path):
    secured = SecuredServer(tmp_path / "secured")
    for role, name in (("submitter", "alice"), ("submitter", "bob"), ("detector", "detector"),
                       ("projector", "projector")):
        secured.creds(role, name)
    with secured.server:
        yield secured


def run(server: SecuredServer, creds: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "DTF_NATS_URL": server.url, "DTF_CREDS": str(creds)}
    return subprocess.run([sys.executable, "-m", "dtf", *args], check=False, capture_output=True, text=True,
                          env=env, timeout=120, cwd=ROOT)


def dtf(server: SecuredServer, creds: Path, *args: str) -> dict:
    done = run(server, creds, *args)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def test_each_submitters_dtf_anomalies_lists_its_own_series_findings_only(tenants_server, tmp_path):
    events = two_tenants(tenants_values())
    expected = list(follow(events).due.values())
    admin = await tenants_server.connect(tenants_server.admin)
    js = admin.jetstream()
    await topology.provision(js)
    await bus.publish_many(js, events)
    detecting = await tenants_server.connect(tenants_server.creds("detector", "detector"))
    projecting = await tenants_server.connect(tenants_server.creds("projector", "projector"))
    stop, follower = asyncio.Event(), Follower()
    services = [asyncio.create_task(run_detector(detecting, stop, follower=follower)),
                asyncio.create_task(run_projector(projecting, tmp_path / "model.duckdb", stop, fetch_timeout=0.5))]
    try:
        await settled(js, follower)
        await caught_up(admin, js)

        def listed(who: str, *args: str) -> list[dict]:
            return dtf(tenants_server, tenants_server.creds("submitter", who), "anomalies", "--json", *args)["anomalies"]

        bobs = await asyncio.to_thread(listed, "bob")
        # A project narrows within the caller's scope (a submission's project defaults to its submitter).
        bobs_project = await asyncio.to_thread(listed, "bob", "--project", "bob")
        other_project = await asyncio.to_thread(listed, "bob", "--project", "alice")
        bob_creds = tenants_server.creds("submitter", "bob")
        grouped = await asyncio.to_thread(dtf, tenants_server, bob_creds, "results", "--group-by", "benchmark",
                                          "--project", "bob", "--json")
        flaky = await asyncio.to_thread(dtf, tenants_server, bob_creds, "flaky", "--project", "bob", "--json")
        alices = await asyncio.to_thread(listed, "alice", "--series", SERIES)
        everyone = await asyncio.to_thread(
            lambda: dtf(tenants_server, tenants_server.admin, "anomalies", "--json")["anomalies"])
        # A forecast reads the log (admins and viewers): the series name is two series here.
        ambiguous = await asyncio.to_thread(run, tenants_server, tenants_server.admin, "forecast", SERIES)
        bobs_forecast = await asyncio.to_thread(
            dtf, tenants_server, tenants_server.admin, "forecast", SERIES, "--owner", "bob", "--json")
    finally:
        stop.set()
        await asyncio.gather(*services)
        for nc in (detecting, projecting, admin):
            await nc.close()

    regression = next(d for d in expected if d.owner == "bob")
    anomaly = next(d for d in expected if d.owner == "alice")
    [row] = bobs
    assert (row["id"], row["kind"], row["owner"], row["series"]) == (regression.id, "regression", "bob", SERIES)
    assert row["change_run_id"] == "bob-run20" and row["result_ids"] == regression.result_ids
    assert bobs_project == bobs and other_project == []
    assert [(r["benchmark"], r["count"]) for r in grouped["results"]] == [("resnet-bench", 30)]
    assert flaky == {"flaky": []}
    [row] = alices
    assert (row["id"], row["kind"], row["owner"], row["run_id"]) == (anomaly.id, "anomaly", "alice", "alice-run12")
    assert sorted((r["owner"], r["id"]) for r in everyone) == sorted((d.owner, d.id) for d in expected)
    assert ambiguous.returncode == 2 and "several submitters (alice, bob): name one with --owner" in ambiguous.stderr
    assert (bobs_forecast["owner"], bobs_forecast["runs"], bobs_forecast["last"]["run_id"]) == ("bob", 30, "bob-run29")
