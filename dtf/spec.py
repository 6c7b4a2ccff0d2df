"""Task specifications: what a submitter asks for, parsed and validated before it becomes an event.

The JSON shape is the seeds' task spec (type, config, requirements, priority, timeout_seconds,
retry_policy, dependencies) so existing spec files keep working; `spec_from_json` is the one parser
used by the CLI (`--spec FILE`), by the coordinator on every TaskSubmitted, and by the fuzz tests.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from dtf import wire
from dtf.pyenv import EnvSpec, check

TOKEN_RE = re.compile(r"^[A-Za-z0-9_-]{1,80}\Z")
"""Ids that appear as NATS subject tokens: no dots, wildcards or whitespace."""

TaskType = Literal["test", "command", "benchmark"]
TASK_TYPES: tuple[str, ...] = ("test", "command", "benchmark")
HARDWARE_KINDS: tuple[str, ...] = ("cpu", "cuda", "rocm", "mps", "webgpu", "browser")

NonNegative = Annotated[float, msgspec.Meta(ge=0)]


class SpecError(ValueError):
    """A task spec that cannot run; the message is the one-line reason shown to the user."""


class Requirements(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """What a worker must offer. `hardware` is any-of; `tags` must all match worker capabilities."""

    hardware: list[str] = []
    min_memory_gb: NonNegative | None = None
    min_cuda_compute: NonNegative | None = None
    gpu_count: Annotated[int, msgspec.Meta(ge=0)] = 0
    browser: str | None = None
    device_type: str | None = None
    tags: dict[str, str] = {}


class RetryPolicy(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """Exponential backoff with full jitter: delay = rand(0, min(max_delay, base * 2**n))."""

    max_retries: Annotated[int, msgspec.Meta(ge=0, le=100)] = 0
    retry_delay_seconds: NonNegative = 1.0
    max_delay_seconds: NonNegative = 60.0
    jitter: bool = True


class WorkspaceRef(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A packed directory in the workspaces object store, named by the sha256 of its archive."""

    sha256: Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
    size: int
    files: int
    # The submitted directory's own name, which the worker's copy keeps: a suite whose root is itself
    # a package (has __init__.py) is imported by pytest under that name, so a copy named otherwise would
    # load the package a second time beside the installed one.
    name: Annotated[str, msgspec.Meta(pattern=r"^(?!\.\.?$)[^/\\\x00]{1,255}$")] = "workspace"


class TaskSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True, omit_defaults=True):
    """One unit of work. `config` keeps the seeds' per-type keys; see `test_paths` and friends."""

    type: TaskType
    name: str = ""
    config: dict[str, Any] = {}
    requirements: Requirements = msgspec.field(default_factory=Requirements)
    priority: int = 5
    timeout_seconds: Annotated[float, msgspec.Meta(gt=0)] = 3600.0
    retry_policy: RetryPolicy = msgspec.field(default_factory=RetryPolicy)
    dependencies: list[str] = []
    labels: dict[str, str] = {}
    workspace: WorkspaceRef | None = None
    deadline: Annotated[datetime, msgspec.Meta(tz=True)] | None = None
    """When the task should have finished (RFC 3339 with an offset). Earliest deadline first among
    equal priority; a task still unsettled after it gets one TaskDeadlineMissed and keeps going."""
    commit: str = ""
    """The git commit the code under test is at, when the submitter knows it (`dtf submit` asks git):
    results are aggregated by it and a test that both passes and fails on one commit is flaky."""
    branch: str = ""
    env: EnvSpec | None = None
    """The Python environment a test task runs in (dtf/pyenv.py); None: the worker's own Python."""


def validate(spec: TaskSpec) -> TaskSpec:
    """Check what types alone cannot; raise SpecError with one clear reason."""
    if spec.type == "test":
        paths = test_paths(spec)
        if not paths:
            raise SpecError("a test task needs config.paths (or the seeds' config.test_file)")
        test_args(spec)
    else:
        command_line(spec)
    for kind in spec.requirements.hardware:
        if kind not in HARDWARE_KINDS:
            raise SpecError(f"unknown hardware kind {kind!r} (known: {', '.join(HARDWARE_KINDS)})")
    for dep in spec.dependencies:
        if not TOKEN_RE.match(dep):
            raise SpecError(f"dependency {dep!r} is not a task id")
    for key, value in spec.labels.items():
        if not key or "\n" in key or "\n" in value:
            raise SpecError(f"label {key!r} must be a non-empty single-line key and value")
    for name, value in (("commit", spec.commit), ("branch", spec.branch)):
        if "\n" in value or len(value) > 256:
            raise SpecError(f"{name} must be one line of at most 256 characters")
    if spec.env is not None and (problem := check(spec.env)) is not None:
        raise SpecError(problem)
    return spec


def test_paths(spec: TaskSpec) -> list[str]:
    paths = spec.config.get("paths", [])
    if isinstance(paths, str):
        paths = [paths]
    if not isinstance(paths, list):
        raise SpecError("config.paths must be a list of test paths or node ids")
    if "test_file" in spec.config:
        paths = [spec.config["test_file"], *paths]
    if not all(isinstance(p, str) and p for p in paths):
        raise SpecError("config.paths must be a list of test paths or node ids")
    return paths


def test_args(spec: TaskSpec) -> list[str]:
    args = spec.config.get("pytest_args", spec.config.get("test_args", []))
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SpecError("config.pytest_args must be a list of strings")
    return args


def command_line(spec: TaskSpec) -> str:
    command = spec.config.get("command")
    if not isinstance(command, str) or not command.strip():
        raise SpecError(f"a {spec.type} task needs config.command (a shell command line)")
    return command


def benchmark_labels(spec: TaskSpec) -> dict[str, str]:
    """The seeds' benchmark config (model, batch_sizes, precision, ...) becomes labels."""
    labels = {
        key: ",".join(map(str, value)) if isinstance(value, list) else str(value)
        for key, value in spec.config.items()
        if key != "command" and isinstance(value, (str, int, float, bool, list))
    }
    return {**labels, **spec.labels}


_spec_decoder = msgspec.json.Decoder(TaskSpec)


def spec_from_json(data: bytes | str) -> TaskSpec:
    """Parse and validate a seeds-style task spec; SpecError names the first problem."""
    try:
        spec = wire.decode(data, _spec_decoder)
    except wire.WireError as exc:
        raise SpecError(f"invalid task spec: {exc}") from None
    return validate(spec)
