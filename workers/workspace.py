"""Workspaces: a submitter's directory packed into a content-addressed archive, and unpacked on workers.

`pack` builds a deterministic tar.gz (sorted names, zeroed mtime/uid/gid/owner names, gzip mtime 0):
the same files give the same bytes, so the sha256 names the content. Inside a git work tree it takes
what `git ls-files -co --exclude-standard` lists (tracked plus untracked-but-not-ignored); elsewhere, or
when git lists nothing (the directory is ignored by an enclosing repository), every file except the
top-level `build` and `dist` outputs. Version control, caches, tox/nox environments, node_modules, `.dtf`
and virtual environments (any directory holding a pyvenv.cfg) are always left out, at any depth.
Symlinks to files are stored as the files they point to; symlinks to directories and special files are
skipped, so an archive holds only regular files.

`upload` stores the archive once in its submitter's own workspaces bucket (`dtf-ws-<submitter>`,
name = sha256; dtf.streams.buckets). `materialize` fetches it from the bucket of the run's owner, as
the event log names it (never a bucket the ref chose), checks the hash, extracts it safely (no
absolute paths, no `..`, regular files and directories only) into a temporary directory and renames
that to `<cache_dir>/<owner>/<sha256>`: a directory with that name is always complete, so it doubles
as the cache, and one owner's cached workspace is never another's by a guessed hash.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import logging
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile
import zlib
from pathlib import Path, PurePosixPath

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError

from dtf import subjects
from dtf.spec import WorkspaceRef
from dtf.streams import buckets, objects, topology

log = logging.getLogger("dtf.worker.workspace")

SKIP_DIRS = frozenset({
    ".git", ".hg", ".svn", "__pycache__", ".dtf", ".tox", ".nox", "node_modules", ".pytest_cache",
    ".mypy_cache", ".ruff_cache",
})
"""Never part of a workspace: a project root is shipped whole, and these are no one's source."""
WALK_SKIP_TOP = frozenset({"build", "dist"})
"""Build outputs, left out when no git ignore file can say so (a package may be called `build`, so
only at the top)."""
VENV_MARKER = "pyvenv.cfg"


class WorkspaceError(Exception):
    """A workspace could not be made available; `category` is the TaskFailed error category."""

    def __init__(self, message: str, category: str = "data") -> None:
        super().__init__(message)
        self.category = category


# --- packing ------------------------------------------------------------------------------------------


def pack(path: str | os.PathLike[str]) -> tuple[bytes, WorkspaceRef]:
    """The directory as a deterministic tar.gz and the ref naming it. Blocking: CPU and disk work,
    call it through `asyncio.to_thread` from async code."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise WorkspaceError(f"{root} is not a directory")
    names = list_files(root)
    raw = io.BytesIO()
    with (
        # level 6: a third of level 9's time for an archive 1% bigger
        gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=6) as gz,
        tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar,
    ):
        for name in names:
            _add_file(tar, root, name)
    data = raw.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    return data, WorkspaceRef(sha256=digest, size=len(data), files=len(names), name=root.name or "workspace")


def list_files(root: Path) -> list[str]:
    """Sorted POSIX paths, relative to root, of the regular files a workspace of `root` holds."""
    names = _git_files(root) or _walk_files(root)
    venvs = {PurePosixPath(name).parent for name in names if PurePosixPath(name).name == VENV_MARKER}
    return sorted(name for name in set(names) if _wanted(root, name, venvs))


def _git_files(root: Path) -> list[str]:
    try:
        inside = subprocess.run(
            ["git", "rev-parse", "--is-inside-work-tree"], cwd=root, capture_output=True, text=True,
            check=False,
        )
        if inside.returncode != 0 or inside.stdout.strip() != "true":
            return []
        listed = subprocess.run(
            ["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root, capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError) as exc:
        log.info("not using git to list %s: %s", root, exc)
        return []
    return [name for name in listed.stdout.decode(errors="surrogateescape").split("\0") if name]


def _walk_files(root: Path) -> list[str]:
    names = []
    for dirpath, dirnames, filenames in os.walk(root):
        base = Path(dirpath).relative_to(root)
        dirnames[:] = [d for d in dirnames
                       if d not in SKIP_DIRS and not (base == Path() and d in WALK_SKIP_TOP)
                       and not (Path(dirpath) / d / VENV_MARKER).is_file()]
        names.extend((base / f).as_posix() for f in filenames)
    return names


def _wanted(root: Path, name: str, venvs: set[PurePosixPath]) -> bool:
    path = PurePosixPath(name)
    if any(part in SKIP_DIRS for part in path.parts[:-1]) or ".." in path.parts:
        return False
    if any(parent in venvs for parent in path.parents):
        return False
    return (root / name).is_file()  # follows symlinks; drops deleted tracked files and special files


def _add_file(tar: tarfile.TarFile, root: Path, name: str) -> None:
    full = root / name
    st = full.stat()
    info = tarfile.TarInfo(name)
    info.size = st.st_size
    info.mode = 0o755 if st.st_mode & stat.S_IXUSR else 0o644
    info.mtime = 0
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    with full.open("rb") as handle:
        tar.addfile(info, handle)


# --- storing ------------------------------------------------------------------------------------------


async def upload(nc: Client, js: JetStreamContext, submitter: str, data: bytes, ref: WorkspaceRef) -> bool:
    """Store the archive under its hash in `submitter`'s bucket unless it is there already; True
    when it was uploaded."""
    if hashlib.sha256(data).hexdigest() != ref.sha256:
        raise WorkspaceError("archive bytes do not match the workspace ref's sha256")
    store = await buckets.own(nc, js, "ws", submitter)
    try:
        await store.get_info(ref.sha256)
        return False
    except NotFoundError:
        pass
    await store.put(ref.sha256, data)
    return True


# --- materializing ------------------------------------------------------------------------------------

NETWORK_ERRORS = (
    nats.errors.TimeoutError, nats.errors.ConnectionClosedError, nats.errors.NoServersError,
    nats.errors.NoRespondersError, asyncio.TimeoutError, ConnectionError,
)


async def materialize(js: JetStreamContext, owner: str, ref: WorkspaceRef, cache_dir: str | os.PathLike[str]) -> Path:
    """The workspace of run owner `owner` under cache_dir, fetched and extracted unless already
    cached. WorkspaceError with category "data" (missing, corrupt, unsafe) or "network" (cannot fetch)."""
    if not subjects.is_token(owner):  # an assignment from before TaskAssigned named the submitter
        raise WorkspaceError(f"workspace {ref.sha256[:12]} has no known owner to fetch it from", "data")
    cache = Path(cache_dir) / owner
    target = cache / ref.sha256
    if target.is_dir():
        if await asyncio.to_thread(_intact, target):
            return target
        log.warning("cached workspace %s was changed since it was unpacked: fetching it again", ref.sha256[:12])
        await asyncio.to_thread(shutil.rmtree, target, True)
    await asyncio.to_thread(cache.mkdir, parents=True, exist_ok=True)
    fd, archive_name = tempfile.mkstemp(prefix=f".{ref.sha256[:12]}-", suffix=".tar.gz", dir=cache)
    archive = Path(archive_name)
    try:
        with os.fdopen(fd, "wb") as handle:
            await _fetch(js, topology.workspaces_bucket(owner), ref, handle)
        await asyncio.to_thread(_verify_and_extract, archive, ref, target)
    finally:
        archive.unlink(missing_ok=True)
    return target


async def _fetch(js: JetStreamContext, bucket: str, ref: WorkspaceRef, handle: io.BufferedWriter) -> None:
    try:
        await objects.get(js, bucket, ref.sha256, writeinto=handle)
    except NotFoundError:
        raise WorkspaceError(f"workspace {ref.sha256[:12]} is not in {bucket}", "data") from None
    except NETWORK_ERRORS as exc:
        raise WorkspaceError(f"cannot fetch workspace {ref.sha256[:12]}: {exc!r}", "network") from None
    except nats.js.errors.Error as exc:  # digest mismatch, bad object metadata
        raise WorkspaceError(f"workspace {ref.sha256[:12]} is damaged in the store: {exc!r}", "data") from None


def _verify_and_extract(archive: Path, ref: WorkspaceRef, target: Path) -> None:
    digest = hashlib.sha256()
    with archive.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != ref.sha256:
        raise WorkspaceError(
            f"workspace {ref.sha256[:12]} failed its hash check (got {digest.hexdigest()[:12]})", "data"
        )
    staging = Path(tempfile.mkdtemp(prefix=f".{ref.sha256[:12]}-", dir=target.parent))
    try:
        extract(archive, staging)
        digest = _seal(staging)
        try:
            staging.rename(target)
            _sealed[target.resolve()] = digest
        except OSError:
            if not target.is_dir():  # not a lost race with another materialize of the same hash
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


_sealed: dict[Path, str] = {}
"""Each cached workspace this process unpacked, with the digest of its content (`_tree_digest`) then.
Kept in memory, not beside the cache, where a task running as the worker's user could rewrite it too;
a cache from before a restart is therefore fetched again once."""


def _tree_digest(root: Path) -> str:
    """sha256 over every file's relative path, mode bits and content (the manifest itself aside)."""
    digest = hashlib.sha256()
    for dirpath, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files):
            path = Path(dirpath) / name
            rel = path.relative_to(root).as_posix()
            digest.update(f"{rel}\0{stat.S_IMODE(path.lstat().st_mode):o}\0".encode())
            with path.open("rb") as handle:
                for block in iter(lambda: handle.read(1 << 20), b""):
                    digest.update(block)
            digest.update(b"\0")
    return digest.hexdigest()


def _seal(root: Path) -> str:
    """Make a freshly unpacked workspace read-only to everyone but its owner (dirs 0755, files 0644 or
    0755); its digest, so `materialize` can tell a changed cache from an intact one."""
    for dirpath, _, files in os.walk(root):
        os.chmod(dirpath, 0o755)
        for name in files:
            path = os.path.join(dirpath, name)
            os.chmod(path, 0o755 if os.stat(path).st_mode & 0o100 else 0o644)
    return _tree_digest(root)


def _intact(root: Path) -> bool:
    """Whether a cached workspace still has the content this process unpacked it with (blocking)."""
    try:
        return _sealed.get(root.resolve()) == _tree_digest(root)
    except OSError:
        return False


def extract(archive: Path, dest: Path) -> None:
    """Extract a workspace archive, refusing anything but relative regular files and directories."""
    try:
        with tarfile.open(archive, mode="r:gz") as tar:
            members = tar.getmembers()
            for member in members:
                _check_member(member)
            # _check_member already refused what the "data" filter would; Python before 3.11.4 lacks it
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(dest, members=members, **safe)
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise WorkspaceError(f"workspace archive is unreadable: {exc}", "data") from None


def _check_member(member: tarfile.TarInfo) -> None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or member.name.startswith(("/", "\\")) or ".." in path.parts:
        raise WorkspaceError(f"workspace archive member {member.name!r} escapes the workspace", "data")
    if not (member.isfile() or member.isdir()):
        raise WorkspaceError(f"workspace archive member {member.name!r} is not a regular file", "data")

