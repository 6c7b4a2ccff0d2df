"""Warm pytest processes: a split run's shards skip the interpreter start-up and the collection.

A shard of `dtf submit --split` carries `config.split = {"suite": [...], "warm": true}`: the whole
suite's arguments, which with the pytest arguments name the process shards may share. The first such
shard of a run on this worker starts a long-lived `python -m pytest <the shard's files> <pytest args>
-p dtf.workers.warm_child ...`; that shard and the next ones of the same run are requests to it, and
it collects each file once, when a shard first needs it (`warm_child` has the protocol). A
worker keeps at most one busy process per running attempt; a second shard arriving while the first
runs gets a process of its own.

What still holds, and how:
    isolation   a process and its workspace copy belong to one run: another run, even of the same
                workspace, gets its own (and its own copy, made once per run rather than per
                shard). Shards of one run share the process and the directory, as tests of one
                `pytest` (or one xdist worker) do; every fixture is torn down after each shard.
    task uids   when the worker runs tasks as task uids (`sandbox`: root, isolation on), each warm
                process runs as a uid of its own from the sandbox's pool, held for the process's
                lifetime, in a directory of its own under the sandbox's base that holds its copy of
                the run's workspace and its HOME/TMPDIR and is handed over to that uid, with the same
                credential-free environment as a cold attempt; a shard's attempt directory is handed
                to it for the shard's report. When the process stops (idle, killed after a timeout
                or cancel, the worker stopping) the uid is released, which kills every process of
                it (a `setsid` child too), and the directory removed. A shard that falls back to cold
                runs as a uid and in a copy of its own too (`Lease`). Without task uids none of this
                happens: processes run as the worker, in the run's shared copy.
    timeouts    a shard past its timeout (counted from its start, a cold start included) or
                cancelled: the process group is killed (SIGTERM, then SIGKILL), the result is
                timed_out/cancelled as for a cold run, and the next shard gets a fresh process.
    output      the process's stdout+stderr go to the shard being served (its LogSink: live log,
                capped log file); the reply line ends a shard's output, so nothing leaks into the next.
    results     the same report plugin writes the same per-test lines, and the runner judges them as
                for a cold run (exit status 0/1 from the process's counts).

When warm cannot serve (the collection failed, a node id is not in it, pytest-xdist arguments),
the shard runs cold with a `[dtf]` note saying why; after a collection failure the run's later
shards go straight to cold. Idle processes are stopped after `idle_s`, and stop themselves a little
later if this worker is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import tempfile
import time
from collections.abc import Coroutine, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dtf.spec import TaskSpec, test_args
from dtf.workers import process, sandbox
from dtf.workers.process import (
    KILL_GRACE_S, PIPE_DRAIN_S, READ_CHUNK, LogSink, ProcessResult, _open_output_pipe, _signal_group,
    _stop_group, run_process,
)
from dtf.workers.warm_child import IDLE_ENV, REQUEST_FD_ENV, TOKEN_ENV, file_of

log = logging.getLogger("dtf.worker.warm")

IDLE_S = 60.0
CHILD_PLUGIN = "dtf.workers.warm_child"
REPORT_PLUGIN = "dtf.workers.pytest_plugin"
XDIST_ARGS = ("-n", "--numprocesses", "--dist", "--tx", "-d")


def suite_of(spec: TaskSpec) -> list[str] | None:
    """The whole suite's arguments when the spec is a split shard that wants a warm process."""
    split = spec.config.get("split")
    if spec.type != "test" or not isinstance(split, dict) or not split.get("warm", True):
        return None
    if spec.env is not None:  # it runs cold in its own environment: the warm processes are the worker's Python
        return None
    suite = split.get("suite")
    if not isinstance(suite, list) or not suite or not all(isinstance(a, str) for a in suite):
        return None
    if any(arg.split("=")[0] in XDIST_ARGS or arg.startswith("-n") for arg in test_args(spec)):
        return None  # pytest-xdist owns the run loop itself
    return suite


class Replies:
    """Splits the process's output into the shard's bytes and the loop's reply lines."""

    def __init__(self, token: str) -> None:
        self.marker = f"\n{token} ".encode()
        self.pending = b""

    def feed(self, chunk: bytes) -> tuple[bytes, list[dict]]:
        """The output to pass on, and any complete replies, in the order they came."""
        self.pending += chunk
        output, replies = b"", []
        while True:
            at = self.pending.find(self.marker)
            if at < 0:  # hold back only a tail that may be the start of a marker cut across chunks
                start = self.pending.rfind(b"\n", max(len(self.pending) - len(self.marker) + 1, 0))
                held = start >= 0 and self.marker.startswith(self.pending[start:])
                cut = start if held else len(self.pending)
                output += self.pending[:cut]
                self.pending = self.pending[cut:]
                return output, replies
            end = self.pending.find(b"\n", at + len(self.marker))
            if end < 0:
                output += self.pending[:at]
                self.pending = self.pending[at:]
                return output, replies
            output += self.pending[:at + 1]
            try:
                replies.append(json.loads(self.pending[at + len(self.marker):end]))
            except ValueError:
                output += self.pending[at + 1:end + 1]
            self.pending = self.pending[end + 1:]


def relocated(cwd: Path, roots: Iterable[Path], dest: Path) -> tuple[Path, Path] | None:
    """The run workspace (one of `roots`) `cwd` lies in, and where `cwd` is in a copy of it made
    under `dest`; None when it lies in none (no workspace, an absolute `config.cwd`). Normalized
    first, so a `config.cwd` of `../x` is not taken to be inside."""
    cwd = Path(os.path.normpath(cwd))
    for root in roots:
        root = Path(os.path.normpath(root))
        if cwd.is_relative_to(root):
            return root, dest / root.name / cwd.relative_to(root)
    return None


@dataclass(eq=False)
class Lease:
    """What one warm process (or one shard's cold fallback) runs with under task uids: a uid taken
    from the sandbox's pool and a directory of its own under the sandbox's base, the uid's, holding
    its copy of the run's workspace and `home` (its HOME and TMPDIR). Per process rather than per
    run: `end` kills every process of the uid, which must not take down a sibling process of the
    same run still serving a shard."""

    uid: int
    dir: Path
    cwd: Path
    """Where the process runs: the planned cwd, moved into the copy when it lies in a run workspace."""
    ended: bool = False

    @property
    def home(self) -> Path:
        return self.dir / "home"

    @classmethod
    async def take(cls, name: str, cwd: Path, roots: Iterable[Path]) -> Lease:
        uid = await asyncio.to_thread(sandbox.sandbox.take_uid)
        assert uid is not None, "a lease is only taken when tasks run as task uids"
        where = sandbox.sandbox.attempt_dir(Path(tempfile.gettempdir()), name)
        lease = cls(uid=uid, dir=where, cwd=cwd)
        try:
            lease.cwd = await asyncio.to_thread(lease._fill, cwd, list(roots))
        except BaseException:
            await lease.end()
            raise
        return lease

    def _fill(self, cwd: Path, roots: list[Path]) -> Path:
        """Make the directory, with the copy and home, and hand it to the uid (blocking)."""
        shutil.rmtree(self.dir, ignore_errors=True)
        self.home.mkdir(parents=True)
        found = relocated(cwd, roots, self.dir)
        if found is not None:
            shutil.copytree(found[0], self.dir / found[0].name, symlinks=True)  # found[0] may be a link
        sandbox.hand_over(self.dir, self.uid)
        os.chmod(self.dir, 0o700)  # the base (0711) only hides names: another task uid cannot read it
        return cwd if found is None else found[1]

    async def end(self) -> None:
        """Kill whatever of the uid is left, hand it back and remove the directory (once)."""
        if self.ended:
            return
        self.ended = True
        await asyncio.to_thread(sandbox.sandbox.release_uid, self.uid)
        await asyncio.to_thread(sandbox.remove, self.dir)


class NotServed(Exception):
    """The warm process cannot run this shard; the message says why (the shard then runs cold)."""

    def __init__(self, reason: str, *, broken: bool = False) -> None:
        super().__init__(reason)
        self.broken = broken


@dataclass(eq=False)
class WarmProcess:
    key: tuple
    proc: asyncio.subprocess.Process
    replies: Replies
    transport: asyncio.ReadTransport
    requests: asyncio.WriteTransport
    queue: asyncio.Queue[dict] = field(default_factory=asyncio.Queue)
    sink: LogSink | None = None
    """The shard being served; output between shards (pytest's own end-of-session lines) is dropped."""
    busy: bool = False
    ready: bool = False
    last_used: float = field(default_factory=time.monotonic)
    pump: asyncio.Task[None] | None = None
    startup_report: Path | None = None
    exited: asyncio.Task[int] | None = None
    lease: Lease | None = None
    """Its uid and directory, under task uids."""

    @classmethod
    async def spawn(cls, key: tuple, argv: Sequence[str], cwd: Path, env: Mapping[str, str],
                    uid: int | None = None) -> WarmProcess:
        as_user = {} if uid is None else {"user": uid, "group": uid, "extra_groups": []}  # as run_process
        token = secrets.token_hex(16)
        loop = asyncio.get_running_loop()
        request_read, request_write = os.pipe()
        requests, _ = await loop.connect_write_pipe(asyncio.BaseProtocol, os.fdopen(request_write, "wb", 0))
        write_fd, reader, transport = await _open_output_pipe()
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, cwd=cwd, env={**env, TOKEN_ENV: token, REQUEST_FD_ENV: str(request_read)},
                stdin=asyncio.subprocess.DEVNULL, stdout=write_fd, stderr=write_fd, pass_fds=(request_read,),
                start_new_session=True, preexec_fn=process.task_limits.preexec(),  # a cold task's limits
                **as_user,
            )
        except BaseException:
            transport.close()
            requests.close()
            raise
        finally:
            os.close(write_fd)
            os.close(request_read)
        warm = cls(key=key, proc=proc, replies=Replies(token), transport=transport, requests=requests)
        warm.pump = asyncio.create_task(warm._pump(reader), name=f"warm-output-{proc.pid}")
        warm.exited = asyncio.create_task(proc.wait(), name=f"warm-wait-{proc.pid}")
        return warm

    @property
    def alive(self) -> bool:
        return self.proc.returncode is None

    async def _pump(self, reader: asyncio.StreamReader) -> None:
        while chunk := await reader.read(READ_CHUNK):
            output, replies = self.replies.feed(chunk)
            if output and self.sink is not None:
                self.sink.write(output)
            for reply in replies:
                self.queue.put_nowait(reply)

    async def next_reply(self, deadline: float,
                         cancel: asyncio.Event) -> dict | Literal["timeout", "cancel", "exit"]:
        getting = asyncio.ensure_future(self.queue.get())
        cancelled = asyncio.ensure_future(cancel.wait())
        try:
            assert self.exited is not None
            done, _ = await asyncio.wait({getting, cancelled, self.exited},
                                         return_when=asyncio.FIRST_COMPLETED,
                                         timeout=max(deadline - time.monotonic(), 0))
            if getting in done:
                return getting.result()
            if cancelled in done:
                return "cancel"
            if self.exited in done:
                return "exit"
            return "timeout"
        finally:
            for waiter in (getting, cancelled):
                waiter.cancel()

    def request(self, nodeids: list[str], report: Path) -> None:
        """Buffered by the transport: a long list of ids never blocks the loop."""
        self.requests.write(json.dumps({"nodeids": nodeids, "report": str(report)}).encode() + b"\n")

    async def stop(self, *, kill: bool = False) -> None:
        """End the process: politely (end of input) unless `kill`; the whole group goes either way."""
        self.requests.close()
        if self.alive and not kill:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self.exited), KILL_GRACE_S)
        if self.alive:
            await _stop_group(self.proc, KILL_GRACE_S)
        _signal_group(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.pump), PIPE_DRAIN_S)
        for task in (self.pump, self.exited):
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in (self.pump, self.exited) if t is not None), return_exceptions=True)
        self.transport.close()


class WarmPool:
    """This worker's warm processes and the per-run workspace copies they run in, under `root` (one
    directory per worker id: what a worker that did not stop cleanly left there is removed on first use)."""

    def __init__(self, root: Path, python: str, *, idle_s: float = IDLE_S) -> None:
        self.root = root
        self._root_ready = False
        self._root_lock = asyncio.Lock()
        self.python = python
        self.idle_s = idle_s
        self.processes: list[WarmProcess] = []
        self.workspaces: dict[tuple[str, str, str], Path] = {}
        self.workspace_used: dict[tuple[str, str, str], float] = {}
        self.locks: dict[tuple, asyncio.Lock] = {}
        self.broken: set[tuple] = set()
        self._settling: set[asyncio.Task[None]] = set()
        """Processes being stopped, leases being ended: `close` waits for them."""
        self._reaper: asyncio.Task[None] | None = None

    def wants(self, spec: TaskSpec) -> bool:
        return suite_of(spec) is not None

    async def _ready_root(self) -> None:
        async with self._root_lock:
            if not self._root_ready:
                await asyncio.to_thread(shutil.rmtree, self.root, True)
                await asyncio.to_thread(self.root.mkdir, parents=True, exist_ok=True)
                self._root_ready = True

    async def workspace(self, run_id: str, cached: Path, name: str) -> Path:
        """The run's own copy of a cached workspace, named `name`, made by its first shard on this worker."""
        key = (run_id, cached.name, name)
        async with self.locks.setdefault(key, asyncio.Lock()):
            if key not in self.workspaces:
                await self._ready_root()
                target = Path(await asyncio.to_thread(tempfile.mkdtemp, prefix=f"{run_id}-", dir=self.root))
                if sandbox.sandbox.by_uid:  # never run in: each process copies it into its lease (`Lease`)
                    await asyncio.to_thread((target / name).symlink_to, cached, True)
                else:
                    await asyncio.to_thread(shutil.copytree, cached, target / name, symlinks=True)
                self.workspaces[key] = target
                self._watch()
            self.workspace_used[key] = time.monotonic()
            return self.workspaces[key] / name

    def _roots(self) -> list[Path]:
        """Every run workspace, as `workspace` returned it."""
        return [path / key[2] for key, path in self.workspaces.items()]

    def launcher(self, run_id: str, spec: TaskSpec):
        """A drop-in for `process.run_process` that serves the shard from a warm process."""
        suite = suite_of(spec)
        assert suite is not None
        nodeids = [str(p) for p in spec.config.get("paths", [])]

        async def launch(argv: Sequence[str], *, cwd: Path, env: Mapping[str, str], sink: LogSink,
                         timeout: float, cancel: asyncio.Event) -> ProcessResult:
            key = (run_id, str(cwd), tuple(suite), tuple(test_args(spec)))
            if key in self.broken:
                return await self._cold(argv, cwd, env, sink, timeout, cancel)
            try:
                return await self._serve(key, nodeids, cwd, env, sink, timeout, cancel)
            except NotServed as why:
                if why.broken:
                    self.broken.add(key)
                sink.note(f"warm pytest not used: {why}; running this shard in a fresh pytest")
                return await self._cold(argv, cwd, env, sink, timeout, cancel)

        return launch

    async def _cold(self, argv: Sequence[str], cwd: Path, env: Mapping[str, str], sink: LogSink,
                    timeout: float, cancel: asyncio.Event) -> ProcessResult:
        """A shard in a fresh pytest. Under task uids, as a cold attempt runs: as a uid of its own, in
        a copy of its own (the run's is never run in), its attempt directory (HOME, TMPDIR, report)
        the uid's; the attempt took no uid for a shard that meant to go warm."""
        if not sandbox.sandbox.by_uid:
            return await run_process(argv, cwd=cwd, env=env, sink=sink, timeout=timeout, cancel=cancel)
        lease = await self._lease("cold", cwd)
        try:
            await asyncio.to_thread(sandbox.hand_over, Path(env["DTF_TEST_REPORT"]).parent, lease.uid)
            return await run_process(argv, cwd=lease.cwd, env=env, sink=sink, timeout=timeout, cancel=cancel,
                                     uid=lease.uid)
        finally:
            await self._settle(lease.end())

    async def _serve(self, key: tuple, nodeids: list[str], cwd: Path,
                     env: Mapping[str, str], sink: LogSink, timeout: float,
                     cancel: asyncio.Event) -> ProcessResult:
        await self._reap()
        started = time.monotonic()
        deadline = started + timeout
        warm = next((w for w in self.processes if w.key == key and not w.busy and w.alive), None)
        if warm is None:
            warm = await self._start(key, sorted({file_of(n) for n in nodeids}), cwd, env)
        warm.busy = True
        warm.sink = sink
        try:
            if not warm.ready:
                reply = await warm.next_reply(deadline, cancel)
                if reply == "exit" or (isinstance(reply, dict) and not reply.get("ready")):
                    await self._discard(warm)
                    why = ("collecting the shard's files failed" if reply != "exit"
                           else f"it exited (code {warm.proc.returncode}) while collecting")
                    raise NotServed(why, broken=True)
                if not isinstance(reply, dict):  # timed out or cancelled while collecting
                    return await self._ended(warm, reply, sink, started)
                warm.ready = True
            report = Path(env["DTF_TEST_REPORT"])
            if warm.lease is not None:  # the process writes the shard's report there, as its uid
                await asyncio.to_thread(sandbox.hand_over, report.parent, warm.lease.uid)
            warm.request(nodeids, report)
            reply = await warm.next_reply(deadline, cancel)
            if not isinstance(reply, dict):
                return await self._ended(warm, reply, sink, started)
            if reply.get("collection_errors"):  # the run's later shards go cold: no use keeping it
                await self._discard(warm)
                raise NotServed("collecting this shard's files failed", broken=True)
            if reply.get("missing"):
                raise NotServed(f"not collected by it: {', '.join(reply['missing'][:3])}")
            elapsed = time.monotonic() - started
            return ProcessResult(reply.get("exitstatus", 3), "exit", elapsed, warm.proc.pid)
        finally:
            warm.sink = None
            warm.busy = False
            warm.last_used = time.monotonic()

    async def _start(self, key: tuple, files: list[str], cwd: Path, env: Mapping[str, str]) -> WarmProcess:
        """A process that collects `files` (the first shard's) at start, and more as shards ask."""
        argv = [self.python, "-m", "pytest", *files, *key[3], "-p", REPORT_PLUGIN, "-p", CHILD_PLUGIN,
                "-p", "no:cacheprovider", "-q"]
        await self._ready_root()
        lease = None
        if sandbox.sandbox.by_uid:  # the planned HOME/TMPDIR are the first shard's, gone after it
            lease = await self._lease("warm", cwd)
            cwd, env = lease.cwd, sandbox.task_env(dict(env), lease.home)
        where = self.root if lease is None else lease.dir  # where the process may write
        startup_report = where / f"startup-{secrets.token_hex(4)}.jsonl"  # collection errors, if any
        child_env = {**env, "DTF_TEST_REPORT": str(startup_report), IDLE_ENV: str(self.idle_s * 2)}
        try:
            warm = await WarmProcess.spawn(key, argv, cwd, child_env, None if lease is None else lease.uid)
        except BaseException as exc:
            if lease is not None:
                await self._settle(lease.end())
            if isinstance(exc, OSError):
                raise NotServed(f"cannot start {self.python}: {exc}") from None
            raise
        warm.startup_report = startup_report
        warm.lease = lease
        self.processes.append(warm)
        self._watch()
        log.info("warm pytest %d started for %s%s", warm.proc.pid, key[0],
                 "" if lease is None else f" as uid {lease.uid}")
        return warm

    async def _ended(self, warm: WarmProcess, how: str, sink: LogSink, started: float) -> ProcessResult:
        """The shard ended without a reply: timed out, cancelled, or the process died."""
        await self._discard(warm, kill=True)
        if how == "exit":
            code = warm.proc.returncode
            sink.note(f"the warm pytest process exited (code {code}) in the middle of the shard")
            # 0 or 1 would read as "tests passed/failed"; a process that died mid-shard is an error
            elapsed = time.monotonic() - started
            return ProcessResult(3 if code in (0, 1) else code, "exit", elapsed, warm.proc.pid)
        return ProcessResult(warm.proc.returncode, "timeout" if how == "timeout" else "cancel",
                             time.monotonic() - started, warm.proc.pid)

    async def _lease(self, kind: str, cwd: Path) -> Lease:
        """A lease for a process to run in `cwd`; taken in a task of its own, so a caller cancelled
        while the workspace is copied (in a thread, which runs on) ends it only once it is whole."""
        taking = asyncio.ensure_future(Lease.take(f"{kind}-{self.root.name}-{secrets.token_hex(6)}", cwd,
                                                  self._roots()))
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:
            async def end_once_taken() -> None:
                with contextlib.suppress(Exception):
                    await (await taking).end()
            await self._settle(end_once_taken())
            raise

    async def _settle(self, step: Coroutine[Any, Any, None]) -> None:
        """Run `step` to its end even if the caller is cancelled meanwhile (the worker stopping in
        the middle of a shard): a process half stopped or a uid never handed back would outlive the
        worker's cleanup. `close` waits for what is still running."""
        task = asyncio.create_task(step)
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)
        await asyncio.shield(task)

    async def _discard(self, warm: WarmProcess, *, kill: bool = False) -> None:
        if warm not in self.processes:  # being stopped already (by the reaper, say)
            return
        self.processes.remove(warm)
        await self._settle(self._stop(warm, kill))

    async def _stop(self, warm: WarmProcess, kill: bool) -> None:
        try:
            await warm.stop(kill=kill)
            if warm.startup_report is not None:
                await asyncio.to_thread(warm.startup_report.unlink, True)
        finally:
            if warm.lease is not None:  # after the group is gone: then nothing of the uid is left running
                await warm.lease.end()

    def _watch(self) -> None:
        """Have idle processes stopped on time, not only when the next shard comes: under task uids
        an idle process holds a uid, and whatever it left running, until it is stopped."""
        if self._reaper is None or self._reaper.done():
            self._reaper = asyncio.create_task(self._reap_loop(), name="warm-reaper")

    async def _reap_loop(self) -> None:
        while self.processes or self.workspaces:
            await asyncio.sleep(self.idle_s / 2)
            try:
                await self._reap()
            except Exception:  # noqa: BLE001 - the next round, or the next shard, tries again
                log.exception("stopping idle warm pytest processes failed")

    async def _reap(self) -> None:
        """Stop processes idle for `idle_s`, and remove run workspaces nothing has used for as long."""
        now = time.monotonic()
        idle = [w for w in self.processes if not w.busy and (not w.alive or now - w.last_used > self.idle_s)]
        for warm in idle:
            await self._discard(warm)
        for key, used in list(self.workspace_used.items()):
            path = self.workspaces.get(key)
            if path is None:  # removed by a concurrent round
                continue
            if now - used > self.idle_s and not any(w.key[1].startswith(str(path)) for w in self.processes):
                del self.workspaces[key], self.workspace_used[key]
                self.locks.pop(key, None)
                await asyncio.to_thread(shutil.rmtree, path, True)

    async def close(self) -> None:
        """Stop every process, hand back every uid, remove every workspace copy (the worker is stopping)."""
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        for warm in list(self.processes):
            await self._discard(warm)
        await asyncio.gather(*self._settling, return_exceptions=True)
        for path in self.workspaces.values():
            await asyncio.to_thread(shutil.rmtree, path, True)
        self.workspaces.clear()
        self.workspace_used.clear()
