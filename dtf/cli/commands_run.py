"""Commands that run processes: `dtf up`, `dtf demo`, and the services `dtf coordinator`,
`dtf worker` and `dtf projector`."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import socket
import sys
import tempfile
from datetime import timedelta
from pathlib import Path

import click

from nats.aio.client import Client
from nats.js.errors import NotFoundError

from dtf.cli.common import (
    EXIT_PERMISSION, CliError, nats_options, parse_pairs, serve, serve_with_nats, service_name,
)
from dtf.cli import early_signals
from dtf.cli.commands_metrics import metrics_endpoint, metrics_option
from dtf import subjects
from dtf.cli.up import System
from dtf.streams import topology
from dtf.schedule import HEARTBEAT_TIMEOUT_S, START_DEADLINE_S, Policy

HEARTBEAT_INTERVAL_S = 5.0

log = logging.getLogger("dtf.cli")


@click.command()
@click.option("--workers", default=2, show_default=True, type=click.IntRange(0, 256), help="Local workers to start.")
@click.option("--data-dir", default=".dtf", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Where the JetStream store, read model, logs and context live.")
@click.option("--nats-port", default=4222, show_default=True, type=click.IntRange(0, 65535),
              help="Client port of the embedded nats-server (0 picks a free one).")
@click.option("--listen", default="127.0.0.1", show_default=True, metavar="HOST",
              help="Address to bind; another address lets workers on other machines connect.")
@click.option("--no-dashboard", is_flag=True, help="Do not start the dashboard.")
@click.option("--dashboard-port", default=0, type=click.IntRange(0, 65535), help="Dashboard port (0 picks one).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), envvar="DTF_METRICS_PORT", default=None,
              help="Serve Prometheus /metrics: the coordinator on this port, the projector on the next, then "
                   "the workers (0: free ports; all are listed in DATA_DIR/context.json).")
@click.option("--cluster", "cluster", default="1", show_default=True, type=click.Choice(["1", "3"]),
              help="nats-server nodes: 3 runs a loopback cluster (ports --nats-port+0..2) with R3 streams.")
@click.option("--no-auth", is_flag=True, help="No users or permissions (anyone who reaches the port may do anything).")
@click.option("--tls", "use_tls", is_flag=True,
              help="Serve TLS; with no --tls-cert a throwaway CA and certificate are made in the data dir.")
@click.option("--tls-cert", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Server certificate (PEM).")
@click.option("--tls-key", type=click.Path(exists=True, dir_okay=False, path_type=Path), help="Its private key (PEM).")
@click.option("--tls-ca", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The CA that signed --tls-cert, for the clients to verify it.")
@click.option("--isolate", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="The workers' task isolation (see `dtf worker --help`).")
@click.option("--start-deadline", default=START_DEADLINE_S, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds an assigned attempt may wait for its TaskStarted before the coordinator "
                   "takes it back and requeues it (its --start-deadline).")
def up(workers: int, data_dir: Path, nats_port: int, listen: str, no_dashboard: bool, dashboard_port: int,
       metrics_port: int | None,
       cluster: str, no_auth: bool, use_tls: bool, tls_cert: Path | None, tls_key: Path | None,
       tls_ca: Path | None, isolate: str, start_deadline: float) -> None:
    """Start a local dtf: nats-server, coordinator, projector and N workers, until SIGINT/SIGTERM."""
    given = [tls_cert, tls_key, tls_ca]
    if any(given) and not all(given):
        raise click.UsageError("--tls-cert, --tls-key and --tls-ca go together")
    system = System(data_dir=data_dir, workers=workers, isolate=isolate, metrics_port=metrics_port,
                    start_deadline=start_deadline, nats_port=nats_port, listen=listen, cluster=int(cluster),
                    auth=not no_auth, tls=use_tls or all(given), tls_cert=tls_cert, tls_key=tls_key, tls_ca=tls_ca)
    system.dashboard_port = None if no_dashboard else dashboard_port

    async def main(stop: asyncio.Event) -> None:
        try:
            await system.start()
        except Exception as exc:
            await system.stop()
            raise CliError(f"could not start: {exc}") from None
        click.echo(f"export DTF_NATS_URL={system.url}")
        if system.admin_creds is not None:
            click.echo(f"export DTF_CREDS={system.admin_creds.resolve()}")
        if system.ca is not None:
            click.echo(f"export DTF_CA={system.ca.resolve()}")
        click.echo(f"dtf up: nats {system.url}, {workers} workers, data in {data_dir}; Ctrl-C stops", err=True)
        if system.dashboard_url:
            click.echo(f"dtf up: dashboard {system.dashboard_url}", err=True)
        if system.metrics_urls:
            click.echo("dtf up: metrics " + ", ".join(f"{n} {u}" for n, u in system.metrics_urls.items()), err=True)
        await stop.wait()
        click.echo("dtf up: stopping (workers hand back unfinished work)...", err=True)
        await system.stop()

    serve(main)


@click.command()
@click.option("--keep", is_flag=True, help="Leave the system running afterwards (Ctrl-C stops it).")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 64))
def demo(keep: bool, workers: int) -> None:
    """Start a throwaway dtf, run the example suite on it, show the results, stop."""
    from dtf.cli.commands_submit import report_run, submit_and_wait_demo

    examples = Path(__file__).resolve().parents[2] / "examples"
    if not (examples / "suite").is_dir():
        raise CliError(f"the example suite is not at {examples}/suite (run dtf demo from a source checkout)")
    data_dir = Path(tempfile.mkdtemp(prefix="dtf-demo-"))
    # A throwaway system on a free loopback port, gone when the demo ends: no users to set up.
    system = System(data_dir=data_dir, workers=workers, nats_port=0, auth=False, dashboard_port=0 if keep else None)
    logging.getLogger("dtf.up").setLevel(logging.WARNING)  # the newcomer wants the run, not the plumbing
    exit_code = 0

    async def main(stop: asyncio.Event) -> None:
        nonlocal exit_code
        await system.start()
        try:
            click.echo(f"dtf demo: nats {system.url}, {workers} workers, data in {data_dir}", err=True)
            if system.dashboard_url:
                click.echo(f"dtf demo: dashboard {system.dashboard_url}", err=True)
            run_id, tasks = await submit_and_wait_demo(system.url, examples)
            exit_code = report_run(run_id, tasks, as_json=False)
            if keep:
                click.echo(f"export DTF_NATS_URL={system.url}")
                click.echo("dtf demo: still running (--keep); try `dtf replay`, `dtf tasks`; Ctrl-C stops", err=True)
                await stop.wait()
        finally:
            await system.stop()
            if not keep:
                shutil.rmtree(data_dir, ignore_errors=True)

    serve(main)
    sys.exit(exit_code)


@click.command()
@nats_options
@metrics_option
@click.option("--id", "name", help="Replica name (default coord-HOST-PID).")
@click.option("--heartbeat-timeout", default=HEARTBEAT_TIMEOUT_S, show_default=True,
              type=click.FloatRange(min=0.1), help="Seconds without a heartbeat before a worker is lost.")
@click.option("--start-deadline", default=START_DEADLINE_S, show_default=True, type=click.FloatRange(min=0.1),
              help="Seconds an assigned attempt may wait for its TaskStarted before it is taken back and requeued "
                   "(workers start before fetching the workspace or building the env).")
@click.option("--replicas", envvar="DTF_REPLICAS", default=1, show_default=True, type=click.IntRange(1, 5),
              help="Stream replicas to provision (3 on a 3-node cluster); existing streams are never shrunk.")
@click.option("--retention-days", type=click.FloatRange(min=0), default=None,
              help="Keep the task history this long (0: forever). Default: leave it as configured.")
def coordinator(nats_url: str | None, creds: str | None, name: str | None, heartbeat_timeout: float,
                start_deadline: float, replicas: int, retention_days: float | None,
                metrics_address: tuple[str, int] | None) -> None:
    """Run a coordinator replica (any number may run at once)."""
    from dtf.cli.coordinator import Coordinator
    from dtf.cli.coordinator_metrics import CoordinatorCollector

    async def body(nc: Client, stop: asyncio.Event) -> None:
        max_age = None if retention_days is None else retention_days * 86400
        await topology.provision(nc.jetstream(), replicas=replicas, max_age_s=max_age)
        policy = Policy(heartbeat_timeout=timedelta(seconds=heartbeat_timeout),
                        start_deadline=timedelta(seconds=start_deadline))
        coordinator = Coordinator(nc, name, policy)
        if endpoint is not None:
            endpoint.add(CoordinatorCollector(coordinator, asyncio.get_running_loop()))
        await coordinator.run(stop)

    with metrics_endpoint(metrics_address, "coordinator") as endpoint:
        serve_with_nats(nats_url, creds, "dtf-coordinator", body)


@click.group(invoke_without_command=True)
@click.pass_context
@nats_options
@metrics_option
@click.option("--id", "worker_id", help="Worker id (default HOST-PID); reuse it to resume after a restart.")
@click.option("--concurrency", default=1, show_default=True, type=click.IntRange(1, 1024),
              help="Attempts run at once; more are handed back.")
@click.option("--capability", "capabilities", multiple=True, metavar="K=V", help="Extra capability tag.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Worker cache: workspaces and attempt scratch (default ~/.cache/dtf/worker).")
@click.option("--heartbeat-interval", default=HEARTBEAT_INTERVAL_S, show_default=True,
              type=click.FloatRange(min=0.05), help="Seconds between heartbeats.")
@click.option("--task-max-memory-mb", type=click.IntRange(min=16), metavar="MB",
              help="Address-space limit of each task process (RLIMIT_AS; default none: it breaks CUDA/JVMs).")
@click.option("--task-max-open-files", default=65536, show_default=True, type=click.IntRange(min=16), metavar="N",
              help="Open-file limit of each task process (RLIMIT_NOFILE).")
@click.option("--isolate", type=click.Choice(["auto", "on", "off"]), default="auto", show_default=True,
              help="Task isolation: a fresh dir and credential-free env, plus a uid per task when root "
                   "(auto: the uid only as root; on: refuse to start without it; off: run in the worker's cwd).")
@click.option("--task-uids", default="20000-20999", show_default=True, metavar="FIRST-LAST",
              help="Unprivileged uids tasks run as when the worker is root (one per running attempt).")
@click.option("--exit-when-idle", type=click.FloatRange(min=0, min_open=True), metavar="SECONDS",
              help="Leave (drain, WorkerLeft, exit 0) after SECONDS with nothing assigned or running.")
def worker(ctx: click.Context, nats_url: str | None, creds: str | None, worker_id: str | None, concurrency: int,
           capabilities: tuple[str, ...], cache_dir: Path | None, heartbeat_interval: float,
           metrics_address: tuple[str, int] | None, task_max_memory_mb: int | None,
           task_max_open_files: int, isolate: str, task_uids: str, exit_when_idle: float | None) -> None:
    """Run a worker agent on this machine (or manage workers: `dtf worker drain ID`)."""
    if ctx.invoked_subcommand is not None:  # `dtf worker drain`: a one-off command, not the service
        early_signals.release()
        return
    from dtf.spec import TOKEN_RE
    from dtf.workers import process, sandbox
    from dtf.workers.agent import WorkerAgent
    from dtf.workers.metrics import WorkerCollector

    process.task_limits = process.Limits(
        memory_bytes=task_max_memory_mb * 1024 * 1024 if task_max_memory_mb else None,
        open_files=task_max_open_files)

    try:
        sandbox.sandbox = sandbox.Sandbox.start(isolate, sandbox.parse_uids(task_uids))  # type: ignore[arg-type]
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--task-uids") from None
    except sandbox.SandboxError as exc:
        raise CliError(str(exc), EXIT_PERMISSION) from None
    tags = parse_pairs(capabilities, "--capability")
    # it may publish only as the worker its credentials name
    worker_id = service_name(creds, "worker", worker_id, "--id") or f"{socket.gethostname().split('.')[0]}-{os.getpid()}"
    if not TOKEN_RE.match(worker_id):
        raise click.BadParameter("letters, digits, _ and - only (at most 80)", param_hint="--id")
    cache = cache_dir or Path.home() / ".cache" / "dtf" / "worker"

    async def body(nc: Client, stop: asyncio.Event) -> None:
        process.task_limits.hold_open_files()  # this process is the worker: its tasks inherit them
        process.use_pidfd_child_watcher()
        agent = WorkerAgent(nc, worker_id=worker_id, concurrency=concurrency, tags=tags, cache_dir=cache,
                            heartbeat_interval=heartbeat_interval, exit_when_idle=exit_when_idle)
        if endpoint is not None:
            endpoint.add(WorkerCollector(agent, asyncio.get_running_loop()))
        await agent.run(stop)

    with metrics_endpoint(metrics_address, f"worker {worker_id}") as endpoint:
        serve_with_nats(nats_url, creds, f"dtf-worker-{worker_id}", body)


@click.command()
@nats_options
@click.option("--db", "db_path", default=".dtf/readmodel.duckdb", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path), help="DuckDB file this projector owns.")
@metrics_option
@click.option("--name", help="Durable consumer name; each database (each projector) needs its own "
                             "(default: the name in projector credentials, else projector).")
def projector(nats_url: str | None, creds: str | None, db_path: Path, name: str | None,
              metrics_address: tuple[str, int] | None) -> None:
    """Run the projector: fold events into the DuckDB read model and answer queries on it."""
    from dtf.projections.projector import run_projector

    name = service_name(creds, "projector", name, "--name") or topology.PROJECTOR  # its own durables only

    async def body(nc: Client, stop: asyncio.Event) -> None:
        await run_projector(nc, db_path, stop, name=name, metrics=endpoint)

    with metrics_endpoint(metrics_address, "projector") as endpoint:
        serve_with_nats(nats_url, creds, "dtf-projector", body)


@worker.command()
@click.argument("worker_id")
@click.option("--reason", default="", help="Why, for the record.")
@nats_options
def drain(worker_id: str, reason: str, nats_url: str | None, creds: str | None) -> None:
    """Give WORKER_ID no new work; what it runs finishes. Restarting the worker ends the drain."""
    from dtf import events as ev
    from dtf.cli.common import acting_name, connected
    from dtf.spec import TOKEN_RE
    from dtf.streams import bus

    if not TOKEN_RE.match(worker_id):
        raise click.BadParameter("not a worker id", param_hint="WORKER_ID")

    async def main() -> None:
        async with connected(nats_url, creds, "dtf-drain") as nc:
            js = nc.jetstream()
            try:
                await js.get_last_msg(topology.EVENTS, subjects.worker(worker_id, "registered"))
            except NotFoundError:
                raise CliError(f"no worker {worker_id} has registered") from None
            await bus.publish(js, ev.WorkerDrainRequested(worker_id=worker_id, by=acting_name(creds), reason=reason))

    asyncio.run(main())
    click.echo(f"dtf: worker {worker_id} is draining: no new work; running tasks finish", err=True)


COMMANDS = [up, demo, coordinator, worker, projector]
