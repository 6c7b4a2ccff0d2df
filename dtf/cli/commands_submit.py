"""`dtf submit`, `dtf wait` and `dtf logs`: putting work on the bus and following it."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import sys
from datetime import UTC, datetime
from pathlib import Path

import click
import msgspec
from nats.js.errors import NotFoundError
from rich.console import Console
from rich.table import Table

from dtf import events as ev
from dtf import subjects
from dtf import pyenv, split
from dtf.cli import rootdir, splitting
from dtf.cli import github_annotations as github
from dtf.cli import failures, interrupt, unschedulable
from dtf.cli import commands_results as ci
from dtf.cli import submit as sub
from dtf.cli.commands_query import ask, pages, refuse_foreign_run, refuse_foreign_task
from dtf.cli.common import (
    EXIT_PERMISSION, CliError, acting_as, acting_name, connected, credential_identity, nats_options, parse_pairs,
    query_scope,
)
from dtf.cli.progress import RunProgress
from dtf.spec import HARDWARE_KINDS, Requirements, RetryPolicy, SpecError, TaskSpec, spec_from_json, test_args
from dtf.state import Fold, TaskState
from dtf.streams import bus, feed, objects, topology
from dtf.streams.retry import PUBLISH_ATTEMPTS


class PassthroughCommand(click.Command):
    """Keeps everything after `--` for pytest instead of letting click read it as paths."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" in args:
            cut = args.index("--")
            ctx.meta["passthrough"] = args[cut + 1:]
            args = args[:cut]
        return super().parse_args(ctx, args)


def parse_requirements(pairs: tuple[str, ...]) -> Requirements:
    """`--requires hardware=cuda|rocm min_memory_gb=16 min_cuda_compute=7.5 gpu_count=2 k=v`."""
    fields: dict = {"tags": {}}
    for key, value in parse_pairs(pairs, "--requires").items():
        try:
            if key == "hardware":
                kinds = [k for k in value.replace(",", "|").split("|") if k]
                unknown = [k for k in kinds if k not in HARDWARE_KINDS]
                if unknown or not kinds:
                    raise ValueError(f"unknown hardware {unknown or value!r} (known: {', '.join(HARDWARE_KINDS)})")
                fields["hardware"] = kinds
            elif key in ("min_memory_gb", "min_cuda_compute"):
                fields[key] = float(value)
                if fields[key] < 0:
                    raise ValueError("must not be negative")
            elif key == "gpu_count":
                fields[key] = int(value)
            elif key in ("browser", "device_type"):
                fields[key] = value
            else:
                fields["tags"][key] = value
        except ValueError as exc:
            raise click.BadParameter(f"{key}={value}: {exc}", param_hint="--requires") from None
    return msgspec.convert(fields, Requirements)


def load_spec_file(path: Path) -> list[TaskSpec]:
    """A seeds-style spec: one JSON object, or a list of them."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as exc:  # RecursionError: absurdly deep nesting (fuzzing)
        raise CliError(f"cannot read spec {path}: {exc}") from None
    items = data if isinstance(data, list) else [data]
    if not items:
        raise CliError(f"{path}: an empty list holds no task spec")
    try:
        return [spec_from_json(json.dumps(item)) for item in items]
    except SpecError as exc:  # one line: the reason may quote a key or value with a newline in it
        raise CliError(f"{path}: {' '.join(str(exc).split())}") from None


def render_report(report: dict) -> None:
    console = Console(width=None if sys.stdout.isatty() else 160)
    table = Table(title=f"run {report['run_id']}")
    for column in ("task", "type", "state", "worker", "attempts", "duration", "passed", "failed", "skipped", "errors"):
        table.add_column(column)
    colors = {"passed": "green", "failed": "red", "error": "red", "timed_out": "red", "cancelled": "yellow",
              "rejected": "yellow", "unschedulable": "yellow"}
    for row in report["tasks"]:
        state = row["state"]
        table.add_row(
            row["name"] or row["task_id"], row["type"] or "-", f"[{colors.get(state, 'white')}]{state}",
            row["worker_id"] or "-", str(row["attempts"]),
            f"{row['duration_s']:.2f}s" if row["duration_s"] is not None else "-",
            *(str(row["tests"][k]) for k in ("passed", "failed", "skipped", "errors")),
        )
    console.print(table)
    s = report["summary"]
    console.print(f"{s['passed']} passed, {s['failed']} failed, {s['skipped']} skipped, {s['errors']} errors")
    for row in report["tasks"]:
        if row["reason"] and (row["state"] != "passed" or not any(row["tests"].values())):  # "no tests selected"
            console.print(f"[yellow]{row['task_id']}: {row['reason']}")


def report_run(run_id: str, tasks: list[TaskState], as_json: bool, gave_up_after: float | None = None,
               failed_tests: list[dict] | None = None, unschedulable_after: float | None = None) -> int:
    """Print the run's report; 0 only when everything passed. With `gave_up_after` (--wait-timeout
    ran out) the report says so and each unsettled task's reason goes to stderr; with
    `unschedulable_after` (--unschedulable-timeout ran out) so does each unschedulable task's, and it
    exits 5. `failed_tests` (`failures.collect`) are listed after it (`"failures"` in JSON) and
    annotated for GitHub."""
    report = sub.run_report(run_id, tasks)
    if gave_up_after is not None:
        report["gave_up_after_s"] = gave_up_after
        report["unsettled"] = sub.unsettled(tasks)
    stuck = unschedulable.stuck(tasks) if unschedulable_after is not None else []
    if unschedulable_after is not None:
        report["unschedulable_after_s"] = unschedulable_after
        report["unschedulable"] = [{"task_id": t.task_id, "reason": t.reason} for t in stuck]
    report["failures"] = failed_tests or []
    if as_json:
        click.echo(json.dumps(report))
    else:
        render_report(report)
        failures.show(report["failures"])
    github.emit(report["failures"], to_stderr=as_json)
    if gave_up_after is not None:
        click.echo(f"dtf: gave up waiting after {gave_up_after:g}s; {len(report['unsettled'])} of {len(tasks)}"
                   " tasks unsettled:", err=True)
        for line in report["unsettled"]:
            click.echo(f"  {line}", err=True)
        return 1
    if unschedulable_after is not None:
        waiting = sum(not t.terminal for t in tasks) - len(stuck)
        click.echo(f"dtf: gave up waiting: for {unschedulable_after:g}s no registered worker could run what is left "
                   f"of run {run_id}" + (f" ({waiting} more tasks wait on these)" if waiting else "") + ":", err=True)
        for task in stuck:
            click.echo(f"  {task.task_id} unschedulable: {task.reason}", err=True)
        click.echo(f"dtf: run {run_id} stays queued (a capable worker that registers takes it); "
                   f"`dtf cancel --run {run_id}` cancels it", err=True)
        return unschedulable.EXIT_UNSCHEDULABLE
    return sub.run_exit_code(tasks)


async def follow_with_progress(js, run_id: str, show: bool, timeout: float | None = None,
                               scope: str | None = None, unschedulable_timeout: float = 0,
                               expect: tuple[str, ...] = ()) -> list[TaskState]:
    """Raises sub.WaitTimeout when `timeout` runs out first, unschedulable.Unschedulable when
    nothing left in the run could run for `unschedulable_timeout` (0: never)."""
    watch = unschedulable.Watch(unschedulable_timeout)
    with RunProgress(run_id, enabled=show) as progress:
        def seen(tasks: list[TaskState]) -> None:
            progress.update(tasks)
            watch.saw(tasks)

        return await watch.until_stuck(sub.follow_run(js, run_id, seen, timeout, scope, expect))


async def follow_or_interrupt(ctx: click.Context, js, run_id: str, show: bool, timeout: float | None,
                             cancel_on_interrupt: bool, creds: str | None,
                             scope: str | None = None, unschedulable_timeout: float = 0,
                             expect: tuple[str, ...] = ()) -> list[TaskState]:
    """Follow the run (`expect`: the task ids just submitted, see sub.follow_run); on SIGINT/SIGTERM
    cancel its unfinished tasks (the flag, or a yes at the terminal) or leave it going, then exit 130."""
    try:
        return await interrupt.until_interrupted(
            follow_with_progress(js, run_id, show, timeout, scope, unschedulable_timeout, expect))
    except interrupt.Interrupted:
        pass
    click.echo(f"\ndtf: interrupted while waiting for run {run_id}", err=True)
    choice = interrupt.on_interrupt(cancel_on_interrupt, sys.stdin.isatty())
    if choice == "ask":  # in a thread: the loop keeps the connection alive while the user thinks
        choice = "cancel" if await asyncio.to_thread(
            click.confirm, "cancel the run?", default=False, err=True) else "leave"
    if choice == "cancel":
        cancelled, total = await cancel_open(js, subjects.run_all(run_id), run_id,
                                             "interrupted while waiting", creds, scope)
        click.echo(f"dtf: cancelled {cancelled} of {total} tasks of run {run_id}", err=True)
    else:
        click.echo(f"dtf: run {run_id} goes on; `dtf wait {run_id}` follows it again", err=True)
    ctx.exit(interrupt.EXIT_INTERRUPTED)


WAIT_TIMEOUT = click.option(
    "--wait-timeout", type=click.FloatRange(min=0, min_open=True), metavar="S",
    help="Give up waiting after S seconds: exit 1 with the reasons of the unsettled tasks.")


async def submit_and_wait_demo(url: str, examples: Path) -> tuple[str, list[TaskState]]:
    """The demo's run: the example suite shipped as a workspace, plus one benchmark task."""
    from dtf.workers import workspace

    async with connected(url, None, "dtf-demo") as nc:
        js = nc.jetstream()
        data, ref = await asyncio.to_thread(workspace.pack, examples)
        await workspace.upload(nc, js, sub.submitter_name(), data, ref)
        base = TaskSpec(type="test", labels={"source": "demo"})
        specs = sub.task_specs(kind="test", paths=[str(examples / "suite")], command=None, base=base,
                               root=examples, workspace=ref)
        bench = TaskSpec(type="benchmark", name="example benchmark",
                         config={"command": f"{sys.executable} bench_example.py", "model": "toy", "batch_size": 8},
                         workspace=ref)
        run_id = sub.new_run_id()
        await sub.submit_run(js, sub.submissions(run_id, [*specs, bench], sub.submitter_name(), "demo"))
        click.echo(f"dtf demo: submitted run {run_id} ({len(specs) + 1} tasks)", err=True)
        return run_id, await follow_with_progress(js, run_id, show=True)


@click.command(cls=PassthroughCommand)
@click.argument("paths", nargs=-1, type=click.Path(exists=True))
@click.option("--command", "command", metavar="CMD", help="Run a shell command as one task.")
@click.option("--benchmark", "benchmark", metavar="CMD",
              help="Run a benchmark command; it writes a JSON object of metrics to $DTF_METRICS.")
@click.option("--spec", "spec_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="A seeds-style task spec JSON file (an object or a list of them).")
@click.option("--wait", is_flag=True,
              help="Wait for the run to finish; exit 0 only if everything passed (1 something failed, 3 refused, "
                   "4 a regression, 5 unschedulable, 130 interrupted).")
@interrupt.CANCEL_ON_INTERRUPT
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@click.option("--priority", type=int, default=5, show_default=True, help="Lower is more urgent.")
@click.option("--requires", multiple=True, metavar="K=V",
              help="hardware=cuda|rocm, min_memory_gb=16, min_cuda_compute=7.5, gpu_count=N, or a tag.")
@click.option("--label", "labels", multiple=True, metavar="K=V", help="Label results for aggregation.")
@ci.ci_options
@github.annotations_option
@click.option("--config", "configs", multiple=True, metavar="K=V", help="Task config (benchmark model, ...).")
@click.option("--retries", type=click.IntRange(0, 100), default=0, show_default=True,
              help="Retries after infrastructure errors and timeouts.")
@click.option("--timeout", type=click.FloatRange(min=0, min_open=True), default=3600, show_default=True,
              help="Seconds before an attempt is killed.")
@click.option("--no-ship", is_flag=True, help="Do not pack the directory: workers share this filesystem.")
@click.option("--run-id", help="Run id (default generated).")
@click.option("--project", default="", help="Project for fair share (default the submitter).")
@click.option("--name", default="", help="Task name (command and benchmark tasks).")
@click.option("--depends-on", "depends_on", multiple=True, metavar="TASK_ID",
              help="Run only after this task passed (repeatable); cancelled if it ends any other way.")
@click.option("--deadline", metavar="TIME",
              help="Finish by TIME (ISO-8601, or from now: 90s, 30m, 2h, 1d): earliest deadline first among "
                   "equal priority; a missed deadline is recorded, the task goes on.")
@click.option("--rerun-failed", "rerun_failed", metavar="RUN_ID",
              help="Submit again, as a new run, the tasks of RUN_ID that did not pass (only the failed tests "
                   "when known).")
@click.option("--split", "split_into", metavar="auto|N",
              help="Collect the tests once and pack them by their recorded durations into shards for N parallel "
                   "workers (auto: the capable workers online), biggest first, smaller ones at the tail.")
@click.option("--group", type=click.Choice(split.GROUPS), default="auto", show_default=True,
              help="With --split: what stays in one shard (auto: files, cut by class then test only when one "
                   "is too long to balance).")
@click.option("--env", "env_mode", type=click.Choice(pyenv.ENV_MODES), default="auto", show_default=True,
              help="Test tasks' Python: uv builds (and caches on the worker) an environment from the project's "
                   "uv.lock, requirements*.txt or pyproject dependencies; system uses the worker's own; auto "
                   "is uv when the project declares dependencies.")
@click.option("--cold", is_flag=True,
              help="With --split: a fresh pytest per shard instead of the worker's warm pytest process.")
@WAIT_TIMEOUT
@unschedulable.UNSCHEDULABLE_TIMEOUT
@nats_options
@click.pass_context
def submit(ctx: click.Context, paths: tuple[str, ...], command: str | None, benchmark: str | None,
           spec_file: Path | None, wait: bool, as_json: bool, priority: int, requires: tuple[str, ...],
           labels: tuple[str, ...], configs: tuple[str, ...], retries: int, timeout: float, no_ship: bool,
           run_id: str | None, project: str, name: str, depends_on: tuple[str, ...], deadline: str | None,
           rerun_failed: str | None, split_into: str | None, group: str, env_mode: str, cold: bool,
           wait_timeout: float | None, unschedulable_timeout: float, cancel_on_interrupt: bool,
           nats_url: str | None, creds: str | None) -> None:
    """Submit tests (PATHS), a --command, a --benchmark, a --spec file, or --rerun-failed RUN_ID.

    Test PATHS ship their whole project to the workers (the directory pytest takes as its rootdir for
    them; packed once, cached by content hash) unless --no-ship, and run from its root, as `pytest
    PATHS` there would; with --command/--benchmark/--spec PATHS are the directory the task runs in.
    Arguments after `--` go to pytest."""
    pytest_args = ctx.meta.get("passthrough", [])
    kinds = [k for k, given in (("command", command), ("benchmark", benchmark), ("spec", spec_file),
                                ("rerun-failed", rerun_failed)) if given]
    if len(kinds) > 1:
        raise click.UsageError(f"give one of --command, --benchmark, --spec, --rerun-failed (got {', '.join(kinds)})")
    if not paths and not kinds:
        raise click.UsageError("nothing to submit: give test PATHS, --command, --benchmark, --spec or --rerun-failed")
    ci.require_wait(ctx, wait)
    if rerun_failed is not None and paths:
        raise click.UsageError("--rerun-failed takes no PATHS: the run's tasks keep their own workspace")
    if split_into is not None and (kinds or not paths):
        raise click.UsageError("--split splits test PATHS; it does not go with --command, --benchmark, --spec "
                               "or --rerun-failed")
    splitting_request = (splitting.Request(splitting.parse_split(split_into), group, warm=not cold)
                         if split_into is not None else None)
    for value, hint in ((run_id, "--run-id"), (rerun_failed, "--rerun-failed"),
                        *((dep, "--depends-on") for dep in depends_on)):
        if value is not None and not subjects.is_token(value):
            raise click.BadParameter(f"{value!r}: letters, digits, _ and - only (at most 80)", param_hint=hint)
    try:
        when = sub.parse_deadline(deadline, datetime.now(UTC)) if deadline else None
    except SpecError as exc:
        raise click.BadParameter(str(exc), param_hint="--deadline") from None
    commit, branch = sub.git_source(Path(paths[0]) if paths else Path.cwd())
    base = TaskSpec(
        type="test", name=name, priority=priority, requirements=parse_requirements(requires),
        timeout_seconds=timeout, retry_policy=RetryPolicy(max_retries=retries),
        labels=parse_pairs(labels, "--label"), config=parse_pairs(configs, "--config"),
        dependencies=list(depends_on), deadline=when, commit=commit, branch=branch,
    )
    if pytest_args:
        base = msgspec.structs.replace(base, config={**base.config, "pytest_args": pytest_args})
    joining = run_id is not None  # a run that may exist already: its new tasks take new task ids
    run_id = run_id or sub.new_run_id()
    asyncio.run(_submit(ctx, run_id, base, paths, command, benchmark, spec_file, rerun_failed, wait, as_json,
                        no_ship, project, wait_timeout, nats_url, creds, splitting_request, joining, env_mode,
                        cancel_on_interrupt, unschedulable_timeout))


async def _submit(ctx, run_id, base, paths, command, benchmark, spec_file, rerun_failed, wait, as_json, no_ship,
                  project, wait_timeout, nats_url, creds, splitting_request=None, joining=False,
                  env_mode="system", cancel_on_interrupt=False, unschedulable_timeout=0.0) -> None:
    from dtf.workers import workspace

    root = None
    if paths and (command or benchmark or spec_file):  # the directory the tasks run in
        root = rootdir.common_ancestor([Path(p) for p in paths])
    elif paths:  # tests: their whole project, as pytest roots it
        found = await asyncio.to_thread(rootdir.find, [Path(p) for p in paths])
        root = found.root
        click.echo(f"dtf: project {root}" + (f" (pytest configuration {found.configfile.name})"
                                             if found.configfile else ""), err=True)
        if not no_ship:  # the user's own arguments come after, and win
            pytest_args = [*rootdir.pinned_args(found), *test_args(base)]
            base = msgspec.structs.replace(base, config={**base.config, "pytest_args": pytest_args})
        try:
            env = pyenv.choose(env_mode, root, f"{sys.version_info.major}.{sys.version_info.minor}")
        except pyenv.EnvError as exc:
            raise CliError(str(exc)) from None
        if env is not None:
            click.echo(f"dtf: python environment {env.digest} from {env.source} "
                       f"({len(env.requirements)} requirements)", err=True)
            base = msgspec.structs.replace(base, env=env)
    old_ids: list[str] | None = None
    async with connected(nats_url, creds, "dtf-submit") as nc:
        js = nc.jetstream()
        ref = None
        if root is not None and not no_ship:
            data, ref = await asyncio.to_thread(workspace.pack, root)
            await workspace.upload(nc, js, acting_as(nc), data, ref)
        try:
            if rerun_failed is not None:
                fold, results = await sub.read_run(js, rerun_failed, query_scope(nc))
                if not fold.tasks:
                    await refuse_foreign_run(nc, rerun_failed)
                    raise CliError(f"no run {rerun_failed} in the event log")
                old_ids, specs = sub.rerun_specs(list(fold.tasks.values()), results)
                if not specs:
                    click.echo(f"dtf: every task of {rerun_failed} passed; nothing to rerun", err=True)
                    return
            elif spec_file is not None:
                specs = [_place(msgspec.structs.replace(s, commit=s.commit or base.commit,
                                                        branch=s.branch or base.branch), ref, root)
                         for s in load_spec_file(spec_file)]
            elif command or benchmark:
                kind = "command" if command else "benchmark"
                specs = sub.task_specs(kind=kind, paths=[], command=command or benchmark, base=base,
                                       root=root, workspace=ref)
            else:
                shards = None
                if splitting_request is not None:
                    base, shards = await splitting.plan_shards(nc, js, splitting_request, base, root, list(paths),
                                                               project or acting_as(nc),
                                                               ref.sha256 if ref else None)
                specs = sub.task_specs(kind="test", paths=list(paths), command=None, base=base, root=root,
                                       workspace=ref, shards=shards)
        except SpecError as exc:
            raise CliError(str(exc)) from None
        if not specs:
            raise CliError(f"no test files found under {', '.join(paths)}")
        submitter = acting_as(nc)
        first = await _first_index(nc, js, run_id, submitter) if joining else 1
        events = sub.submissions(run_id, specs, submitter, project, first)
        if old_ids is not None:
            events = sub.remap_dependencies(events, old_ids)
        try:
            sub.oversized(events)
        except sub.Refused as exc:
            raise CliError(f"not submitted: {exc}") from None
        acks = await sub.submit_run(js, events)
        await _check_admitted(nc, js, run_id, events, acks)
        click.echo(f"dtf: submitted run {run_id} ({len(events)} tasks)"
                   + (f", rerunning {', '.join(old_ids)} of {rerun_failed}" if old_ids else ""), err=True)
        if not wait:
            if as_json:
                click.echo(json.dumps({"run_id": run_id, "tasks": [e.task_id for e in events]}))
            else:
                click.echo(run_id)
            return
        try:
            tasks = await follow_or_interrupt(ctx, js, run_id, True, wait_timeout, cancel_on_interrupt, creds,
                                              query_scope(nc), unschedulable_timeout,
                                              tuple(e.task_id for e in events))
        except sub.WaitTimeout as out:
            ctx.exit(report_run(run_id, out.tasks, as_json, gave_up_after=wait_timeout))
        except unschedulable.Unschedulable as out:
            ctx.exit(report_run(run_id, out.tasks, as_json, unschedulable_after=unschedulable_timeout))
        failed_tests = await failures.collect(js, run_id, tasks, query_scope(nc))
        code = await ci.after_wait(ctx, nc, run_id, tasks, report_run(run_id, tasks, as_json,
                                                                      failed_tests=failed_tests))
    ctx.exit(code)


async def _first_index(nc, js, run_id: str, submitter: str) -> int:
    """Where new tasks start in a `--run-id` run that may exist: after its tasks, if it is ours."""
    if query_scope(nc) is None:  # may read the log: the fold says who owns the run and what it holds
        fold, _ = await sub.read_run(js, run_id)
        try:
            return sub.joining(fold, run_id, submitter)
        except sub.Refused as exc:
            raise CliError(f"not submitted: {exc}") from None
    # A submitter reads only its own runs, through the projector; a run of another's is refused on
    # the record by the coordinator (TaskRejected "run R belongs to submitter S").
    rows = await ask(nc, "tasks", {"run_id": run_id})
    return sub.next_index(run_id, [row["task_id"] for row in rows])


async def _check_admitted(nc, js, run_id: str, events: list[ev.TaskSubmitted], acks) -> None:
    """Exit 2 when some event is no task of this run: dropped by the stream as a duplicate, or
    refused for a task id or a run that is someone else's (read back from the log, folded as every
    reader folds it), where waiting would report another's work as ours."""
    messages = []
    if query_scope(nc) is None:
        messages = [(m.subject, m.seq, m.data) async for m in bus.read(js, topology.EVENTS, [subjects.run_all(run_id)])]
    problems = sub.refusals(messages, events, acks)
    if problems:
        raise CliError(f"run {run_id}: {len(problems)} of {len(events)} tasks not submitted: "
                       + "; ".join(problems[:5]) + ("; ..." if len(problems) > 5 else ""))


def _place(spec: TaskSpec, ref, root: Path | None) -> TaskSpec:
    """A spec file's tasks run in the shipped PATHS workspace, in PATHS itself with --no-ship, or
    (no PATHS) in the submitter's directory, for workers that share this filesystem."""
    if ref is not None:
        return msgspec.structs.replace(spec, workspace=ref)
    return msgspec.structs.replace(spec, config={"cwd": str(root or Path.cwd()), **spec.config})


@click.command()
@click.argument("run_id")
@click.option("--json", "as_json", is_flag=True, help="Print JSON on stdout.")
@ci.ci_options
@github.annotations_option
@WAIT_TIMEOUT
@unschedulable.UNSCHEDULABLE_TIMEOUT
@interrupt.CANCEL_ON_INTERRUPT
@nats_options
@click.pass_context
def wait(ctx: click.Context, run_id: str, as_json: bool, wait_timeout: float | None, unschedulable_timeout: float,
         cancel_on_interrupt: bool, nats_url: str | None, creds: str | None) -> None:
    """Wait for a run to finish; same output and exit codes as `submit --wait`."""
    if not subjects.is_token(run_id):
        raise click.BadParameter("not a run id", param_hint="RUN_ID")

    async def main() -> int:
        async with connected(nats_url, creds, "dtf-wait") as nc:
            js = nc.jetstream()
            scope = query_scope(nc)  # a submitter follows its own feed, where others' runs do not exist
            if not await sub.run_exists(js, run_id, scope):
                await refuse_foreign_run(nc, run_id)
                raise CliError(f"no run {run_id} in the event log" + (f" of {scope}'s runs" if scope else ""))
            tasks = await follow_or_interrupt(ctx, js, run_id, not as_json or sys.stderr.isatty(), wait_timeout,
                                              cancel_on_interrupt, creds, scope, unschedulable_timeout)
            failed_tests = await failures.collect(js, run_id, tasks, scope)
            return await ci.after_wait(ctx, nc, run_id, tasks, report_run(run_id, tasks, as_json,
                                                                          failed_tests=failed_tests))

    try:
        code = asyncio.run(main())
    except sub.WaitTimeout as out:
        ctx.exit(report_run(run_id, out.tasks, as_json, gave_up_after=wait_timeout))
    except unschedulable.Unschedulable as out:
        ctx.exit(report_run(run_id, out.tasks, as_json, unschedulable_after=unschedulable_timeout))
    ctx.exit(code)


@click.command()
@click.argument("task_id")
@click.option("--follow", "-f", is_flag=True, help="Stream the output of a running task until it ends.")
@nats_options
def logs(task_id: str, follow: bool, nats_url: str | None, creds: str | None) -> None:
    """Print a task's output (the full log of its last attempt)."""
    if not subjects.is_token(task_id):
        raise click.BadParameter("not a task id", param_hint="TASK_ID")
    asyncio.run(_logs(task_id, follow, nats_url, creds))


async def _task_history(js, task_id: str, scope: str | None) -> list[tuple[int, ev.Event]]:
    """The task's events with their sequences, each on the subject it belongs on (a forgery is no
    part of it)."""
    events = []
    async for msg in feed.read(js, subjects.task_any_run(task_id), scope):
        try:
            event = ev.decode(msg.data)
        except ev.DecodeError:
            continue
        if subjects.mismatch(event, msg.subject) is None:
            events.append((msg.seq, event))
    return events


def _assignee(events: list[tuple[int, ev.Event]]) -> str:
    """The worker the task's latest attempt was assigned to ("" before any)."""
    assigned = [e for _, e in events if isinstance(e, ev.TaskAssigned)]
    return assigned[-1].worker_id if assigned else ""


def _finished(events: list[tuple[int, ev.Event]]) -> ev.ResultReported | None:
    """The last result from the worker its attempt was assigned to: its log_ref is looked up in that
    worker's bucket, and a result of another worker's names nothing there."""
    workers = {e.attempt: e.worker_id for _, e in events if isinstance(e, ev.TaskAssigned)}
    results = [e for _, e in events if isinstance(e, ev.ResultReported) and workers.get(e.attempt) == e.worker_id]
    return results[-1] if results else None


async def _logs(task_id: str, follow: bool, nats_url: str | None, creds: str | None) -> None:
    async with connected(nats_url, creds, "dtf-logs") as nc:
        js = nc.jetstream()
        scope = query_scope(nc)  # a submitter reads its own tasks' events from its feed
        history = await _task_history(js, task_id, scope)
        if not history:
            if scope is not None:  # refused for another's task; a task of its own older than the feed is in the read model
                try:
                    await _stored_log_by_query(nc, task_id)
                except CliError as exc:
                    if exc.exit_code == EXIT_PERMISSION:
                        raise
                    raise CliError(f"no task {task_id} among {scope}'s tasks: a submitter may read only its own "
                                   f"tasks' logs ({exc.format_message()})", EXIT_PERMISSION) from None
                return
            raise CliError(f"no task {task_id} in the event log")
        result = _finished(history)
        if follow and result is None:
            await _follow_live(nc, js, task_id, history, scope)
            return
        if result is None:
            raise CliError(f"task {task_id} has no output yet (use --follow to stream it)")
        if result.log_ref is None:
            sys.stdout.write(result.output_tail)
            return
        if scope is not None:
            await _stored_log_by_query(nc, task_id)
            return
        bucket = topology.artifacts_bucket(result.worker_id)
        try:
            data = await objects.get(js, bucket, result.log_ref)
        except NotFoundError:
            raise CliError(f"log {result.log_ref} is gone from {bucket}") from None
        sys.stdout.buffer.write(data)
        sys.stdout.flush()


async def _stored_log_by_query(nc, task_id: str) -> None:
    """A submitter's own task log, which the projector reads from the artifacts store for it."""
    async for body in pages(nc, "log", {"task_id": task_id}):
        sys.stdout.buffer.write(base64.b64decode(body["data"]))
    sys.stdout.flush()


async def _follow_live(nc, js, task_id: str, history: list[tuple[int, ev.Event]], scope: str | None) -> None:
    """Print live output chunks until the task ends: those of the worker its attempt is assigned to
    (another worker may publish on its own subject for this task, and is not shown). Output from
    before we subscribed is not repeated here: `dtf logs TASK_ID` prints the whole stored log once
    the task has finished."""
    owner = next((e.submitter for _, e in history if isinstance(e, ev.TaskSubmitted)), "*")
    worker = _assignee(history)
    seen = history[-1][0]

    async def show(msg) -> None:
        if subjects.live_log_worker(msg.subject) == worker:
            sys.stdout.buffer.write(msg.data)
            sys.stdout.flush()

    live = await nc.subscribe(subjects.live_log(owner, task_id, "*"), cb=show)
    try:
        reader = feed.read(js, subjects.task_any_run(task_id), scope, follow=True)
        async with contextlib.aclosing(reader) as messages:  # closed before the connection drains
            async for msg in messages:
                try:
                    event = ev.decode(msg.data)
                except ev.DecodeError:
                    continue
                if msg.seq <= seen or subjects.mismatch(event, msg.subject) is not None:
                    continue
                if isinstance(event, ev.TaskAssigned):
                    worker = event.worker_id
                ended = isinstance(event, ev.ResultReported) and event.worker_id == worker
                if ended or isinstance(event, (ev.TaskCancelled, ev.TaskRejected)):
                    return
    finally:
        await live.unsubscribe()


@click.command()
@click.argument("task_id", required=False)
@click.option("--run", "run_id", metavar="RUN_ID", help="Cancel every unfinished task of this run.")
@click.option("--reason", default="cancelled by the user", show_default=True)
@nats_options
def cancel(task_id: str | None, run_id: str | None, reason: str, nats_url: str | None, creds: str | None) -> None:
    """Cancel a task (TASK_ID) or a whole run (--run); running attempts are killed by their workers."""
    if bool(task_id) == bool(run_id):
        raise click.UsageError("give TASK_ID or --run RUN_ID")
    target = task_id or run_id
    if not subjects.is_token(target):
        raise click.BadParameter("not an id", param_hint="TASK_ID" if task_id else "--run")
    scope = subjects.task_any_run(target) if task_id else subjects.run_all(target)
    asyncio.run(_cancel(scope, target, reason, nats_url, creds))


async def _cancel(scope: str, target: str, reason: str, nats_url: str | None, creds: str | None) -> None:
    async with connected(nats_url, creds, "dtf-cancel") as nc:
        if scope == subjects.run_all(target) and not await sub.run_exists(nc.jetstream(), target, query_scope(nc)):
            await refuse_foreign_run(nc, target)
        try:
            cancelled, total = await cancel_open(nc.jetstream(), scope, target, reason, creds, query_scope(nc))
        except CliError as unknown:
            if unknown.exit_code == EXIT_PERMISSION and scope != subjects.run_all(target):
                try:  # the read model tells "another's" from "unknown"
                    await refuse_foreign_task(nc, target)
                except CliError as refused:
                    if refused.exit_code == EXIT_PERMISSION:
                        raise refused from None
                    # no projector: "not among mine" still holds
            raise
        click.echo(f"dtf: cancelled {cancelled} of {total} tasks", err=True)


async def cancel_open(js, scope: str, target: str, reason: str, creds: str | None,
                      feed_scope: str | None = None) -> tuple[int, int]:
    """Cancel every unfinished task under `scope` (a task's or a run's subjects) as `dtf cancel`
    does; how many were cancelled, of how many known."""
    fold = Fold()
    async for msg in feed.read(js, scope, feed_scope):  # a submitter's from its own feed
        fold.apply(msg.subject, msg.seq, msg.data)
    if not fold.tasks:
        if feed_scope is not None:  # its feed holds all its own tasks: this one is not, or is not its own
            raise CliError(f"no task or run {target} among {feed_scope}'s: a submitter may cancel only its own",
                           EXIT_PERMISSION)
        raise CliError(f"nothing known as {target} in the event log")
    actor = acting_name(creds)
    identity = credential_identity(creds)
    as_submitter = identity is not None and identity.role == "submitter"
    open_tasks = [t for t in fold.tasks.values() if not t.terminal]
    if as_submitter and (others := [t.task_id for t in open_tasks if t.submitter != actor]):
        raise CliError(f"{actor} may cancel only its own tasks, not {', '.join(others[:5])}", EXIT_PERMISSION)
    for task in open_tasks:
        # A cancel counts only as the task's submitter's (dtf.subjects.may_cancel): an operator
        # with the right to publish for it does so, and names itself in the reason.
        by = actor if as_submitter else task.submitter
        why = reason if by == actor else f"{reason} (cancelled by {actor})".strip()
        event = ev.TaskCancelled(id=f"cancel-{task.task_id}-{by}", run_id=task.run_id, task_id=task.task_id,
                                 reason=why, by=by)
        try:
            await bus.publish(js, event, expected_seq=fold.task_seq[(task.run_id, task.task_id)],
                              attempts=PUBLISH_ATTEMPTS)
        except bus.Conflict:  # it moved on meanwhile: say so rather than guess
            click.echo(f"dtf: {task.task_id} changed while cancelling; run `dtf cancel` again", err=True)
            continue
    return len(open_tasks), len(fold.tasks)


COMMANDS = [submit, wait, logs, cancel]
