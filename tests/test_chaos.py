"""Chaos, the short version (bench/chaos.py is the long one, with figures): a 3-node cluster with R3
streams, 2 coordinator replicas, 3 workers and a projector as real processes, ~100 short tasks, while
a worker is SIGKILLed mid-task, a worker is SIGSTOPped past its heartbeat timeout and resumed, a
coordinator replica is SIGKILLed, a NATS follower node is SIGKILLed and restarted and the projector
is SIGKILLed and restarted. Checked from the event log: every task has exactly one passing terminal
outcome, none completed twice, the paused worker's late result is stored but settles nothing; and
the rebuilt read model equals the live one. No timed asserts: the harness waits on conditions with
generous bounds and names what it waited for when a bound passes."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dtf.projections.rebuild import rebuild, tables_equal

from bench import chaos

pytestmark = pytest.mark.slow


async def test_under_worker_coordinator_node_and_projector_faults_every_task_passes_exactly_once(tmp_path):
    h = chaos.Harness(tmp_path / "chaos", task_sleep=0.5, marker_sleep=3.0, say=print)
    h.faults_over = 0.0
    feeder = None
    try:
        await h.start()
        feeder = asyncio.create_task(h.feed(60, backlog=4, chunk=4, cap=100))
        await asyncio.sleep(2.0)
        await asyncio.gather(h.kill_worker(), h.kill_coordinator(1))
        await h.pause_worker()
        await h.kill_node(leader=False, down_s=2.0)
        await h.kill_projector()
        h.faults_over = chaos.now()
        h.feeding = False
        await asyncio.wait_for(feeder, 180)
        await h.wait_all_settled(180)
        await h.quiesce()
        figures = chaos.analyse(h, await h.history())
        rebuilt = tmp_path / "rebuilt.duckdb"
        await rebuild(h.js, rebuilt)
        differences = await asyncio.to_thread(tables_equal, h.db, rebuilt)
    finally:
        if feeder is not None:
            feeder.cancel()
        await h.close()

    assert figures["tasks"] >= 60
    assert figures["tasks_lost"] == 0, figures["problems"]
    assert figures["tasks_not_passed"] == 0, figures["problems"]
    assert figures["tasks_completed_twice"] == 0, figures["problems"]
    [late] = figures["late_results"]
    assert late["late_result_stored"] and not late["late_result_settled"], late
    assert all(s is not None for s in figures["worker_sigkill_to_reassignment_s"]), figures["faults"]
    assert figures["problems"] == []
    # The live projector interleaves DTF_HEARTBEATS with DTF_EVENTS as they arrive and a rebuild
    # applies the last heartbeats after the events: the fold's worker verdicts must not care.
    assert differences == [], differences
