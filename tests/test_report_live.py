"""`dtf report` against a real nats-server and a live projector: the run's read model and the detector's
findings come over NATS request-reply, and --fail-on-regression exits 4 only for the run that brought
a regression."""

from __future__ import annotations

import asyncio
import sys

from junitparser import JUnitXml

from dtf import events as ev
from dtf.streams import bus
from result_history import T0, Finished, messages
from test_projection_live import caught_up, projector


def bench(run_id, latency):
    return Finished(run_id, f"{run_id}-b", worker="w-gpu", type="benchmark", name="infer", labels={"model": "bert"},
                    metrics={"latency_ms": latency})


async def dtf(url, *args):
    """Run the CLI as a user would, without blocking the loop the projector answers on."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "dtf", *args, "--nats", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await process.communicate()
    return process.returncode, out.decode(), err.decode()


async def test_fail_on_regression_exits_4_for_the_run_that_brought_one(nats_server, nc, js, tmp_path):
    history = [bench("r-before", 10.0), bench("r-after", 12.5)]
    regression = ev.RegressionDetected(
        id="regression-x-r-after", time=T0, run_id="r-after", task_id="r-after-b",
        series="infer:latency_ms{model=bert}@cpu+cuda", benchmark="infer", metric="latency_ms",
        labels={"model": "bert"}, hardware=["cpu", "cuda"], better="lower", size=0.25, confidence=0.99,
        detector="test", before=10.0, after=12.5, change_run_id="r-after")
    for msg in messages(history):
        await js.publish(msg.subject, msg.data)
    await bus.publish(js, regression)
    async with projector(nc, tmp_path / "read.duckdb"):
        await caught_up(nc, js)
        code, out, err = await dtf(nats_server.url, "report", "--run", "r-after", "--format", "junit",
                                   "--fail-on-regression")
        assert code == 4, err
        assert "regression in infer:latency_ms{model=bert}@cpu+cuda: 10.0 -> 12.5" in err
        [suite] = list(JUnitXml.fromstring(out))
        assert (suite.name, suite.tests, suite.failures) == ("infer", 1, 0)

        code, out, err = await dtf(nats_server.url, "report", "--run", "r-before", "--format", "md",
                                   "--fail-on-regression")
        assert code == 0, err
        assert "dtf run `r-before` passed" in out and "regression" not in out

        code, _, err = await dtf(nats_server.url, "report", "--run", "r-nowhere")
        assert code == 2 and "no run r-nowhere" in err
