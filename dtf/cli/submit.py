"""Turning `dtf submit` flags into TaskSubmitted events, and following a run until it settles.

Building specs and summarising a run are pure functions (tested without a server); `submit_run` and
`follow_run` are the thin I/O around them.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import msgspec
from nats.js import JetStreamContext

from dtf import events as ev
from dtf import subjects
from dtf.spec import TaskSpec, WorkspaceRef, validate
from dtf.state import Fold, TaskState
from dtf.streams import bus, topology

TEST_FILE_GLOBS = ("test_*.py", "*_test.py")


def new_run_id() -> str:
    return f"run-{datetime.now(UTC):%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def submitter_name() -> str:
    name = os.environ.get("USER") or os.environ.get("LOGNAME") or "anonymous"
    return "".join(c if c.isalnum() or c in "_-" else "_" for c in name)[:80] or "anonymous"


def workspace_root(paths: list[Path]) -> Path:
    """The directory a test submission ships: the path itself, or the common parent of several."""
    resolved = [p.resolve() for p in paths]
    dirs = [p if p.is_dir() else p.parent for p in resolved]
    return Path(os.path.commonpath([str(d) for d in dirs]))


def split_test_paths(args: list[str], root: Path) -> list[list[str]]:
    """One task per test file: a directory becomes its test files, a file or node id stays itself.
    Paths are made relative to the shipped root (#3 replaces this with history-based packing)."""
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


def task_specs(
    *, kind: str, paths: list[str], command: str | None, base: TaskSpec,
    root: Path | None, workspace: WorkspaceRef | None,
) -> list[TaskSpec]:
    """The specs one submission becomes (validated; SpecError says what is wrong)."""
    where = {} if workspace is not None or root is None else {"cwd": str(root)}
    if kind == "test":
        assert root is not None
        shards = split_test_paths(paths, root)
        specs = [
            msgspec.structs.replace(
                base, type="test", name=" ".join(shard),
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


def submissions(run_id: str, specs: list[TaskSpec], submitter: str, project: str) -> list[ev.TaskSubmitted]:
    return [
        ev.TaskSubmitted(
            id=f"submit-{run_id}-{i}", run_id=run_id, task_id=f"{run_id}-{i}", submitter=submitter,
            project=project, spec=spec,
        )
        for i, spec in enumerate(specs, 1)
    ]


async def submit_run(js: JetStreamContext, events: list[ev.TaskSubmitted]) -> None:
    await bus.publish_many(js, events)


# --- following a run ------------------------------------------------------------------------------


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
        "reason": task.reason or None,
    }


def run_report(run_id: str, tasks: list[TaskState]) -> dict:
    rows = [task_summary(t) for t in sorted(tasks, key=lambda t: (t.submitted_at or datetime.min.replace(tzinfo=UTC), t.task_id))]
    summary = {key: sum(r["tests"][key] for r in rows) for key in ("passed", "failed", "skipped", "errors")}
    return {"run_id": run_id, "tasks": rows, "summary": summary}


def run_exit_code(tasks: list[TaskState]) -> int:
    """0 when every task passed, 1 when any test or task failed, errored, timed out or was stopped."""
    return 0 if all(t.status == "passed" for t in tasks) else 1


async def follow_run(
    js: JetStreamContext, run_id: str, on_change: Callable[[list[TaskState]], None] | None = None,
) -> list[TaskState]:
    """Fold the run's events until every task in it is terminal; returns the final task states."""
    fold = Fold()
    messages = bus.read(js, topology.EVENTS, [subjects.run_all(run_id)], follow=True)
    async with contextlib.aclosing(messages):
        async for msg in messages:
            fold.apply(msg.subject, msg.seq, msg.data)
            if msg.pending == 0:
                tasks = list(fold.tasks.values())
                if on_change is not None:
                    on_change(tasks)
                if tasks and all(t.terminal for t in tasks):
                    return tasks
    return list(fold.tasks.values())


async def run_exists(js: JetStreamContext, run_id: str) -> bool:
    try:
        await js.get_last_msg(topology.EVENTS, subjects.run_all(run_id))
    except Exception:  # noqa: BLE001 - nats-py raises NotFoundError or a generic API error here
        return False
    return True

