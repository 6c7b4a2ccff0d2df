"""Turning `dtf submit` flags into TaskSubmitted events, and following a run until it settles.

Building specs and summarising a run are pure functions (tested without a server); `submit_run` and
`follow_run` are the thin I/O around them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import re
import secrets
import subprocess
from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
from nats.js import JetStreamContext
from nats.js.api import PubAck

from dtf import admission, subjects
from dtf import events as ev
from dtf.spec import SpecError, TaskSpec, WorkspaceRef, test_paths, validate
from dtf.state import Fold, TaskState
from dtf.streams import bus, feed, topology

TEST_FILE_GLOBS = ("test_*.py", "*_test.py")


def new_run_id() -> str:
    return f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def submitter_name() -> str:
    name = os.environ.get("USER") or os.environ.get("LOGNAME") or "anonymous"
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:80] or "anonymous"


def git_source(directory: Path) -> tuple[str, str]:
    """The git commit and branch `directory` is at, "" for what is unknown (no git, not a repository,
    a detached head outside GitHub Actions). Results are aggregated by them; flaky tests need the commit."""

    def git(*args: str) -> str:
        try:
            where = directory if directory.is_dir() else directory.parent
            done = subprocess.run(["git", "-C", str(where), *args], capture_output=True, text=True,
                                  timeout=10, check=False)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return done.stdout.strip() if done.returncode == 0 else ""

    commit = git("rev-parse", "HEAD")
    if not commit:
        return "", ""
    # Actions checks a pull request out detached; it names the branch in the environment.
    branch = git("symbolic-ref", "--short", "-q", "HEAD") or os.environ.get("GITHUB_HEAD_REF") \
        or os.environ.get("GITHUB_REF_NAME", "")
    return commit, branch


def split_test_paths(args: list[str], root: Path) -> list[list[str]]:
    """One task per test file: a directory becomes its test files, a file or node id stays itself.
    Paths are made relative to the shipped project root, where the worker runs them."""
    shards: list[list[str]] = []
    for arg in args:
        path_part, sep, rest = arg.partition("::")
        path = Path(path_part).resolve()
        if path.is_dir():
            files = sorted({f for glob in TEST_FILE_GLOBS for f in path.rglob(glob)
                            if not any(part.startswith(".") for part in f.relative_to(path).parts)})
            shards.extend([str(f.relative_to(root))] for f in files)
        else:
            shards.append([str(path.relative_to(root)) + sep + rest])
    return shards


def source_prefix(root: Path) -> str:
    """Where the shipped tree sits under the submitter's directory (`tests` for `dtf submit tests/`
    from a repository's root; "" when it is that directory or elsewhere). The worker's pytest sees
    the tree as its rootdir; with this, failures name their files, and JUnit its classnames, as the
    submitter's own pytest there would (`tests/test_mod.py`, `tests.test_mod.TestClass`)."""
    try:
        relative = root.resolve().relative_to(Path.cwd().resolve())
    except ValueError:
        return ""
    return "" if relative == Path(".") else relative.as_posix()


def task_specs(
    *, kind: str, paths: list[str], command: str | None, base: TaskSpec,
    root: Path | None, workspace: WorkspaceRef | None, shards: list[list[str]] | None = None,
) -> list[TaskSpec]:
    """The specs one submission becomes (validated; SpecError says what is wrong). A test submission
    is one task per test file, or per given shard of node ids (`--split`)."""
    where = {} if workspace is not None or root is None else {"cwd": str(root)}
    if kind == "test":
        assert root is not None
        if prefix := source_prefix(root):
            where["source_prefix"] = prefix
        shards = split_test_paths(paths, root) if shards is None else shards
        specs = [
            msgspec.structs.replace(
                base, type="test", name=" ".join(shard) if len(shard) == 1 else f"{shard[0]} (+{len(shard) - 1})",
                config={**base.config, **where, "paths": shard}, workspace=workspace,
            )
            for shard in shards
        ]
    else:
        specs = [msgspec.structs.replace(
            base, type=kind, name=base.name or (command or "")[:80],
            config={**base.config, **where, "command": command}, workspace=workspace,
        )]
    return [validate(spec) for spec in specs]


_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*\Z")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}


def parse_deadline(text: str, now: datetime) -> datetime:
    """`--deadline`: a time from now (`90s`, `30m`, `2h`, `1d`) or an ISO-8601 time; a time with no
    offset is local time. Returned in UTC."""
    relative = _RELATIVE.match(text)
    if relative:
        try:
            return now + timedelta(**{_UNITS[relative.group(2)]: float(relative.group(1))})
        except OverflowError:
            raise SpecError(f"deadline {text!r} is too far away") from None
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise SpecError(f"deadline {text!r} is neither a time (2026-01-31T18:00:00Z) nor a delay (30m, 2h)") from None
    if when.tzinfo is None:
        when = when.astimezone()  # the submitter's local time
    return when.astimezone(UTC)


def _rebase(nodeid: str, paths: list[str]) -> str | None:
    """A node id as pytest reported it (relative to its rootdir) as a path the task can run from its
    working directory: itself when it names one of the task's files, or under the one file it ends."""
    file, sep, rest = nodeid.partition("::")
    files = [p.partition("::")[0] for p in paths]
    if file in files:
        return nodeid
    under = [f for f in files if f.endswith("/" + file)]
    return under[0] + sep + rest if len(under) == 1 else None


def rerun_specs(tasks: list[TaskState], results: dict[str, ev.ResultReported]) -> tuple[list[str], list[TaskSpec]]:
    """What `submit --rerun-failed` submits for a finished run: every task that did not pass, with its
    own spec (a rejected submission has none and is left out). A test task whose last attempt failed
    and reported its failing tests runs just those node ids; otherwise (unknown, moved to the
    artifacts store, or node ids it cannot place) its whole paths. Returns the old task ids and the
    specs, in submission order; dependencies still point at the old ids (see `remap_dependencies`)."""
    old_ids, specs = [], []
    for task in sorted(tasks, key=lambda t: (t.submitted_at or datetime.min.replace(tzinfo=UTC), t.task_id)):
        if task.status == "passed" or task.spec is None:
            continue
        spec = task.spec
        result = results.get(task.task_id)
        if spec.type == "test" and task.status == "failed" and result is not None:
            paths = test_paths(spec)
            failed = [t.nodeid for t in result.tests if t.outcome in ("failed", "error")]
            rebased = [_rebase(nodeid, paths) for nodeid in dict.fromkeys(failed)]
            if rebased and all(rebased):
                config = {k: v for k, v in spec.config.items() if k not in ("paths", "test_file")}
                spec = msgspec.structs.replace(spec, config={**config, "paths": rebased})
        old_ids.append(task.task_id)
        specs.append(spec)
    return old_ids, specs


def remap_dependencies(events: list[ev.TaskSubmitted], old_ids: list[str]) -> list[ev.TaskSubmitted]:
    """A rerun task depends on the rerun of its dependency when that runs again; a dependency that
    passed (or is not rerun) stays as it was, already settled."""
    new_id = {old: event.task_id for old, event in zip(old_ids, events)}
    return [
        _identified(msgspec.structs.replace(event, spec=msgspec.structs.replace(
            event.spec, dependencies=[new_id.get(dep, dep) for dep in event.spec.dependencies])))
        if any(dep in new_id for dep in event.spec.dependencies) else event
        for event in events
    ]


def last_results(run_events: list[tuple[str, int, bytes]]) -> tuple[Fold, dict[str, ev.ResultReported]]:
    """Fold a run's messages; keep each task's result from its current attempt's worker."""
    fold = Fold()
    results: dict[str, ev.ResultReported] = {}
    for subject, seq, data in run_events:
        applied = fold.apply(subject, seq, data)
        event = applied.event
        if isinstance(event, ev.ResultReported):
            task = fold.tasks.get(event.task_id)
            if task is not None and task.attempt == event.attempt and task.worker_id == event.worker_id:
                results[event.task_id] = event
    return fold, results


def _identified(event: ev.TaskSubmitted) -> ev.TaskSubmitted:
    """The event with an id derived from what it asks for: JetStream's dedup (on Nats-Msg-Id) then
    only ever drops this very submission sent twice, never a different one under a reused task id."""
    digest = hashlib.blake2b(msgspec.json.encode([event.task_id, event.submitter, event.project, event.spec]),
                             digest_size=8).hexdigest()
    return msgspec.structs.replace(event, id=f"submit-{event.task_id}-{digest}")


def submissions(run_id: str, specs: list[TaskSpec], submitter: str, project: str, first: int = 1,
                ) -> list[ev.TaskSubmitted]:
    """One TaskSubmitted per spec, task ids `<run>-<first>`, `<run>-<first + 1>`, ..."""
    return [
        _identified(ev.TaskSubmitted(
            run_id=run_id, task_id=f"{run_id}-{i}", submitter=submitter, project=project, spec=spec,
        ))
        for i, spec in enumerate(specs, first)
    ]


class Refused(Exception):
    """A submission the log would refuse, or did: the message says which tasks and why."""


def oversized(events: list[ev.TaskSubmitted]) -> None:
    """Refuse up front what admission would reject for its size (`dtf.admission.oversize`)."""
    problems = [f"task {e.task_id} ({e.spec.name or e.spec.type}): {why}"
                for e in events if (why := admission.oversize(e)) is not None]
    if problems:
        raise Refused("; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else ""))


def next_index(run_id: str, task_ids: list[str]) -> int:
    """The first task number after every `<run>-<n>` already in the run: new work in an existing run
    gets new task ids (submitting a task id twice is refused)."""
    prefix = f"{run_id}-"
    taken = [int(t[len(prefix):]) for t in task_ids if t.startswith(prefix) and t[len(prefix):].isdigit()]
    return max(taken, default=0) + 1


def joining(fold: Fold, run_id: str, submitter: str) -> int:
    """Where `submitter`'s new tasks start in run `run_id` as folded so far (1 for a new run);
    Refused when another submitter owns the run."""
    why = admission.foreign_run(run_id, submitter, fold.owners)
    if why is not None:
        raise Refused(why)
    return next_index(run_id, [t.task_id for t in fold.run_tasks(run_id)])


def refusals(fold_messages: list[tuple[str, int, bytes]], events: list[ev.TaskSubmitted],
             acks: list[PubAck]) -> list[str]:
    """Why some of `events` (stored at `acks`) are not tasks of this run, from the run's log folded
    up to now: a duplicate the stream dropped, a task id someone submitted first, or a run another
    submitter owns. Empty when none: any other refusal (a cycle, a spec that cannot run) makes a
    rejected task of the run, which its report shows."""
    problems = [f"task {e.task_id}: the stream already holds this very submission (stored at seq {a.seq}); "
                "nothing new was submitted" for e, a in zip(events, acks) if a.duplicate]
    ours = {a.seq: e for e, a in zip(events, acks) if not a.duplicate}
    fold = Fold()
    for subject, seq, data in fold_messages:
        if seq in ours:
            event = ours[seq]
            why = (admission.foreign_run(event.run_id, event.submitter, fold.owners)
                   or admission.taken_task_id(event, fold.tasks.get(event.task_id)))
            if why is not None:
                problems.append(f"task {event.task_id}: {why}")
        fold.apply(subject, seq, data)
    return problems


async def submit_run(js: JetStreamContext, events: list[ev.TaskSubmitted]) -> list[PubAck]:
    return await bus.publish_many(js, events)


# --- following a run ------------------------------------------------------------------------------


def task_reason(task: TaskState) -> str:
    """The task's own reason, plus its missed deadline if it missed one."""
    parts = [task.reason] if task.reason else []
    if task.deadline_missed is not None and task.spec is not None and task.spec.deadline is not None:
        parts.append(f"missed its deadline {task.spec.deadline:%Y-%m-%dT%H:%M:%SZ}")
    return "; ".join(parts)


def task_summary(task: TaskState) -> dict:
    counts = msgspec.structs.asdict(task.counts)
    if task.terminal and task.status != "passed" and not any(counts.values()):
        counts["errors"] = 1  # it never ran to a result: count it, so the summary cannot look green
    return {
        "task_id": task.task_id,
        "type": task.spec.type if task.spec else None,
        "name": task.spec.name if task.spec else "",
        "state": task.status,
        "worker_id": task.worker_id or None,
        "attempts": task.attempt,
        "duration_s": task.duration_s,
        "tests": counts,
        "reason": task_reason(task) or None,
    }


def run_report(run_id: str, tasks: list[TaskState]) -> dict:
    rows = [task_summary(t) for t in sorted(tasks, key=lambda t: (t.submitted_at or datetime.min.replace(tzinfo=UTC), t.task_id))]
    summary = {key: sum(r["tests"][key] for r in rows) for key in ("passed", "failed", "skipped", "errors")}
    return {"run_id": run_id, "tasks": rows, "summary": summary}


def run_exit_code(tasks: list[TaskState]) -> int:
    """0 when every task passed, 1 when any test or task failed, errored, timed out or was stopped."""
    return 0 if all(t.status == "passed" for t in tasks) else 1


def unsettled(tasks: list[TaskState]) -> list[str]:
    """One line per task that has not ended: what `--wait-timeout` reports when it gives up."""
    lines = []
    for task in sorted(tasks, key=lambda t: t.task_id):
        if task.terminal:
            continue
        why = task_reason(task) or {"pending": "waiting for a free capable worker",
                                    "assigned": f"assigned to {task.worker_id}, not started",
                                    "running": f"running on {task.worker_id}"}.get(task.status, "")
        lines.append(f"{task.task_id} {task.status}" + (f": {why}" if why else ""))
    return lines


class WaitTimeout(Exception):
    """`--wait-timeout` ran out before the run settled; `tasks` are the states at that moment."""

    def __init__(self, tasks: list[TaskState]) -> None:
        super().__init__(f"{sum(not t.terminal for t in tasks)} tasks unsettled")
        self.tasks = tasks


PROGRESS_EVERY_S = 0.2
"""How often at most `follow_run` shows progress: each showing looks at every task of the run."""


async def follow_run(
    js: JetStreamContext, run_id: str, on_change: Callable[[list[TaskState]], None] | None = None,
    timeout: float | None = None, scope: str | None = None, expect: Iterable[str] = (),
) -> list[TaskState]:
    """Fold the run's events until every task in it is terminal; returns the final task states.
    A submitter (`scope`, its name) reads them from its own feed (dtf.streams.feed). `expect` are
    task ids just submitted: unsettled until seen terminal, so a run whose earlier tasks are done does
    not end before the feed (which the coordinator writes a little later) shows the new ones.
    With `timeout` (seconds), raises WaitTimeout with the states so far when it runs out.
    `on_change` sees the states whenever the follow has caught up, at most every PROGRESS_EVERY_S
    (a change held back is shown when that time is up) and once at the end. What is unsettled is
    tracked per event, so following a run of 10,000 tasks costs per event, not per task."""
    fold = Fold()
    unsettled: set[str] = set(expect)
    loop = asyncio.get_running_loop()
    shown = -PROGRESS_EVERY_S
    held_back: asyncio.TimerHandle | None = None

    def show() -> None:
        nonlocal shown, held_back
        if held_back is not None:  # shown now: a held-back showing would only repeat it
            held_back.cancel()
            held_back = None
        shown = loop.time()
        if on_change is not None:
            on_change(list(fold.tasks.values()))

    async def follow() -> list[TaskState]:
        nonlocal held_back
        messages = feed.read(js, subjects.run_all(run_id), scope, follow=True)
        async with contextlib.aclosing(messages):
            async for msg in messages:
                fold.apply(msg.subject, msg.seq, msg.data)
                task = fold.tasks.get(subjects.parse(msg.subject).task_id or "")
                if task is not None:
                    (unsettled.discard if task.terminal else unsettled.add)(task.task_id)
                if msg.pending != 0:
                    continue
                if fold.tasks and not unsettled:
                    show()
                    return list(fold.tasks.values())
                wait = shown + PROGRESS_EVERY_S - loop.time()
                if wait <= 0:
                    show()
                elif held_back is None:
                    held_back = loop.call_later(wait, show)
        return list(fold.tasks.values())

    try:
        return await asyncio.wait_for(follow(), timeout)
    except TimeoutError:
        raise WaitTimeout(list(fold.tasks.values())) from None
    finally:
        if held_back is not None:
            held_back.cancel()


async def read_run(js: JetStreamContext, run_id: str, scope: str | None = None,
                   ) -> tuple[Fold, dict[str, ev.ResultReported]]:
    """A run's events as they are now, folded, with each task's last result (for --rerun-failed)."""
    messages = [(m.subject, m.seq, m.data) async for m in feed.read(js, subjects.run_all(run_id), scope)]
    return last_results(messages)


async def run_exists(js: JetStreamContext, run_id: str, scope: str | None = None) -> bool:
    """Whether the log holds the run (for a submitter: a run of its own)."""
    if scope is not None:
        messages = feed.read(js, subjects.run_all(run_id), scope)
        async with contextlib.aclosing(messages):
            async for _ in messages:
                return True
        return False
    try:
        await js.get_last_msg(topology.EVENTS, subjects.run_all(run_id))
    except Exception:  # noqa: BLE001 - nats-py raises NotFoundError or a generic API error here
        return False
    return True

