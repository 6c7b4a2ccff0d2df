"""Running one child process for a task: its own process group, merged output streamed to a capped log,
and a timeout or cancellation that takes down the whole group.

The child starts in a new session (so its process group is its pid). It ends in one of three ways:
it exits; the timeout passes; `cancel` is set. In the last two the group gets SIGTERM, and SIGKILL if
the leader has not exited after `kill_grace` seconds. In every case the group is then SIGKILLed once
more, so a test's stray background process (a `sleep &`, a server it forgot) does not outlive it.

stdout and stderr go through one pipe into `log_path`; each chunk is also handed to `on_output`
(for the live log). Past `max_log_bytes` the file stops growing and says so; the last `tail_bytes`
are always kept in memory for the result's `output_tail`. `note` lines the worker adds (why a task
was killed, why it errored) go to the log even past the cap.

The child starts under `Limits` (soft and hard, so they bind the task and everything it starts, and
it cannot raise them again): open files always, address space when configured (`dtf worker
--task-max-memory-mb`). RLIMIT_AS is off by default because CUDA, JVMs and sanitizers reserve far
more address space than they use, and a limit would break them rather than protect. Where the OS
refuses a limit (a hard limit below the wish, no such resource) the task runs without it.

Limits the worker already holds itself (`dtf worker` takes the open-files one at start) are simply
inherited; only the others are set between fork and exec. That matters for speed: Python spawns
with vfork only without a preexec_fn, and a full fork of a worker process costs several times more
(`bench/dispatch.py` runs thousands of no-op tasks). For the same reason Python 3.11, whose asyncio
starts a thread per child to wait for it, is given the pidfd watcher 3.12 uses by default.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import resource
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

log = logging.getLogger("dtf.worker.process")

MAX_LOG_BYTES = 64 * 1024 * 1024
TAIL_BYTES = 4096
KILL_GRACE_S = 3.0
PIPE_DRAIN_S = 5.0
READ_CHUNK = 64 * 1024

OutputCallback = Callable[[bytes], None]


@dataclass(frozen=True)
class Limits:
    """Resource limits a task's process starts with; None leaves the worker's own."""

    memory_bytes: int | None = None
    """RLIMIT_AS: the task's address space (a malloc past it fails with MemoryError / ENOMEM)."""
    open_files: int | None = 65536
    """RLIMIT_NOFILE."""

    def _targets(self) -> list[tuple[int, int]]:
        """Each limit to set, with the value soft and hard both get: the wish, or the hard limit
        where that is lower (a limit can only be lowered)."""
        targets = []
        wishes = ((resource.RLIMIT_AS, self.memory_bytes), (resource.RLIMIT_NOFILE, self.open_files))
        for which, wanted in wishes:
            if wanted is not None:
                _, hard = resource.getrlimit(which)
                targets.append((which, wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)))
        return targets

    def apply(self) -> None:
        """In the child, between fork and exec: soft and hard limit both, so the task cannot raise
        them. Never raises (an exception here would abort the exec with an unclear error)."""
        try:
            targets = self._targets()
        except (ValueError, OSError):
            return
        for which, value in targets:
            try:
                resource.setrlimit(which, (value, value))
            except (ValueError, OSError):
                pass  # the OS does not allow it here: run without

    def preexec(self) -> Callable[[], None] | None:
        """`apply`, for a child to run between fork and exec; None when this process holds exactly
        these limits already, so a child inherits them and can be spawned with vfork."""
        held = all(resource.getrlimit(which) == (value, value) for which, value in self._targets())
        return None if held else self.apply

    def hold_open_files(self) -> None:
        """Take the open-files limit on this process itself (a worker: it needs far fewer), so its
        children inherit it instead of each setting it between fork and exec."""
        Limits(open_files=self.open_files).apply()


def use_pidfd_child_watcher() -> None:
    """Python 3.11 only (3.12 does this by itself): wait for children through pidfds on the running
    event loop instead of a thread per child. A no-op where unsupported."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    try:
        os.close(os.pidfd_open(os.getpid()))  # the kernel may lack it (before 5.3) or a sandbox refuse it
    except OSError:
        return
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.get_event_loop_policy().set_child_watcher(watcher)


DEFAULT_LIMITS = Limits()
task_limits = DEFAULT_LIMITS
"""The limits every task of this worker process gets; `dtf worker` sets them from its options."""


class LogSink:
    """The attempt's output file, capped, with the last bytes kept for the result."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_LOG_BYTES, tail_bytes: int = TAIL_BYTES,
                 on_output: OutputCallback | None = None) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self.tail_bytes = tail_bytes
        self.on_output = on_output
        self.written = 0
        self.truncated = False
        self.tail = bytearray()
        self._file = path.open("wb")

    def write(self, chunk: bytes) -> None:
        self._keep_tail(chunk)
        self._forward(chunk)
        if self.truncated:
            return
        room = self.max_bytes - self.written
        if len(chunk) > room:
            self._file.write(chunk[:room])
            self.written += room
            self.truncated = True
            self._file.write(
                f"\n[dtf] output truncated: the log keeps the first {self.max_bytes} bytes\n".encode()
            )
            return
        self._file.write(chunk)
        self.written += len(chunk)

    def note(self, text: str) -> None:
        """A line from the worker itself, e.g. why the task was killed."""
        line = f"\n[dtf] {text}\n".encode()
        self._file.write(line)
        self._keep_tail(line)
        self._forward(line)

    def _keep_tail(self, chunk: bytes) -> None:
        self.tail += chunk[-self.tail_bytes:]
        if len(self.tail) > self.tail_bytes:
            del self.tail[: len(self.tail) - self.tail_bytes]

    def _forward(self, chunk: bytes) -> None:
        if self.on_output is None:
            return
        try:
            self.on_output(chunk)
        except Exception:  # a broken live-log consumer must not break the task
            log.exception("on_output callback failed")

    def close(self) -> None:
        self._file.close()

    def tail_text(self) -> str:
        return bytes(self.tail).decode("utf-8", errors="replace")


@dataclass
class ProcessResult:
    exit_code: int | None
    ended_by: Literal["exit", "timeout", "cancel"]
    duration_s: float
    pid: int


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


async def _pump(stream: asyncio.StreamReader, sink: LogSink) -> None:
    while chunk := await stream.read(READ_CHUNK):
        sink.write(chunk)


async def _stop_group(proc: asyncio.subprocess.Process, grace: float) -> None:
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        _signal_group(proc.pid, signal.SIGKILL)
        await proc.wait()


async def _open_output_pipe() -> tuple[int, asyncio.StreamReader, asyncio.ReadTransport]:
    """A pipe for the child's stdout+stderr that asyncio does not tie to the process: with a
    subprocess PIPE, `Process.wait()` also waits for every holder of the pipe (a background grandchild)
    to go, so the leader's exit could not be seen on its own."""
    read_fd, write_fd = os.pipe()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_CHUNK, loop=loop)
    try:
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader, loop=loop), os.fdopen(read_fd, "rb", 0)
        )
    except BaseException:
        os.close(write_fd)
        raise
    return write_fd, reader, transport


async def run_process(
    argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], sink: LogSink, timeout: float,
    cancel: asyncio.Event, kill_grace: float = KILL_GRACE_S, limits: Limits | None = None,
    uid: int | None = None,
) -> ProcessResult:
    """Run argv to its end, its timeout or its cancellation; never blocks the event loop. `limits`
    default to this worker's `task_limits`. `uid`: run as that user (gid the same, no supplementary
    groups; `sandbox`), set by subprocess itself so no preexec_fn is needed for it."""
    as_user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}
    started = time.monotonic()
    write_fd, reader, transport = await _open_output_pipe()
    try:
        proc = await asyncio.create_subprocess_exec(
            *argv, cwd=cwd, env=dict(env), stdin=asyncio.subprocess.DEVNULL,
            stdout=write_fd, stderr=write_fd, start_new_session=True,
            preexec_fn=(limits or task_limits).preexec(), **as_user,
        )
    except BaseException:
        transport.close()
        raise
    finally:
        os.close(write_fd)  # the child holds its own copy; EOF comes when the whole group is gone
    pump = asyncio.create_task(_pump(reader, sink), name=f"output-{proc.pid}")
    exited = asyncio.create_task(proc.wait(), name=f"wait-{proc.pid}")
    cancelled = asyncio.create_task(cancel.wait(), name=f"cancel-{proc.pid}")
    ended_by: Literal["exit", "timeout", "cancel"] = "exit"
    try:
        done, _ = await asyncio.wait({exited, cancelled}, timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if exited not in done:
            ended_by = "cancel" if cancelled in done else "timeout"
            await _stop_group(proc, kill_grace)
        _signal_group(proc.pid, signal.SIGKILL)  # stragglers left in the group
        try:
            await asyncio.wait_for(asyncio.shield(pump), PIPE_DRAIN_S)
        except TimeoutError:
            sink.note("output pipe still held open by a process that left the group; stopped reading")
    finally:
        for task in (pump, exited, cancelled):
            task.cancel()
        await asyncio.gather(pump, exited, cancelled, return_exceptions=True)
        transport.close()
        if proc.returncode is None:  # we were cancelled ourselves: leave nothing running
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.shield(proc.wait())
    return ProcessResult(proc.returncode, ended_by, time.monotonic() - started, proc.pid)
