"""Workspaces: deterministic packing (plain directories and git work trees), content-addressed upload,
and a safe, cached, hash-checked materialize against a real object store."""

from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile

import msgspec
import pytest

from dtf.spec import WorkspaceRef
from dtf.streams import buckets, topology
from dtf.workers import workspace


def make_tree(root):
    (root / "pkg").mkdir(parents=True)
    (root / "pkg" / "mod.py").write_text("X = 1\n")
    (root / "run.sh").write_text("#!/bin/sh\necho hi\n")
    (root / "run.sh").chmod(0o755)
    (root / "__pycache__").mkdir()
    (root / "__pycache__" / "mod.cpython-311.pyc").write_bytes(b"junk")
    (root / ".dtf").mkdir()
    (root / ".dtf" / "state").write_text("local")
    return root


def names_in(data: bytes) -> list[str]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        return tar.getnames()


def test_packing_the_same_files_twice_gives_the_same_bytes_whatever_their_mtimes(tmp_path):
    root = make_tree(tmp_path / "a")
    first, ref = workspace.pack(root)
    os.utime(root / "pkg" / "mod.py", (1_000_000, 1_000_000))
    again, ref_again = workspace.pack(root)
    assert first == again and ref == ref_again
    assert ref.sha256 == hashlib.sha256(first).hexdigest() and ref.size == len(first)
    assert names_in(first) == ["pkg/mod.py", "run.sh"] and ref.files == 2
    with tarfile.open(fileobj=io.BytesIO(first), mode="r:gz") as tar:
        members = {m.name: m for m in tar.getmembers()}
    assert members["run.sh"].mode == 0o755 and members["pkg/mod.py"].mode == 0o644
    assert {(m.mtime, m.uid, m.gid, m.uname) for m in members.values()} == {(0, 0, 0, "")}
    assert first[:2] == b"\x1f\x8b" and first[4:8] == b"\0\0\0\0"  # gzip header mtime 0


def test_a_workspace_keeps_its_directory_name_and_refuses_names_that_are_paths(tmp_path):
    _, ref = workspace.pack(make_tree(tmp_path / "mysuite"))
    assert ref.name == "mysuite"
    assert msgspec.json.decode(msgspec.json.encode(ref), type=WorkspaceRef) == ref
    for bad in ("..", ".", "a/b", "", "x" * 256):
        raw = msgspec.json.encode({"sha256": ref.sha256, "size": 1, "files": 1, "name": bad})
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(raw, type=WorkspaceRef)
    older = msgspec.json.encode({"sha256": ref.sha256, "size": 1, "files": 1})  # before names travelled
    assert msgspec.json.decode(older, type=WorkspaceRef).name == "workspace"


def test_inside_a_git_work_tree_ignored_files_stay_out(tmp_path):
    root = make_tree(tmp_path / "repo")
    (root / ".gitignore").write_text("*.log\n")
    (root / "debug.log").write_text("noise")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "pkg/mod.py"], cwd=root, check=True)
    data, _ = workspace.pack(root)
    assert names_in(data) == [".gitignore", "pkg/mod.py", "run.sh"]  # tracked + untracked, not ignored


def with_environments(root):
    """Virtual environments, tool caches and build outputs a project root holds beside its source."""
    for name in (".venv/pyvenv.cfg", ".venv/lib/site.py", "env2/pyvenv.cfg", "env2/bin/python",
                 ".tox/py311/x.py", "node_modules/left-pad/index.js", ".pytest_cache/v/x",
                 "build/lib/pkg/mod.py", "dist/pkg.whl", "src/build/__init__.py"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    return root


@pytest.mark.parametrize("in_git", [False, True], ids=["walked", "git-listed"])
def test_environments_and_caches_stay_out_of_a_workspace_at_any_depth(tmp_path, in_git):
    root = with_environments(make_tree(tmp_path / "proj"))
    if in_git:  # nothing ignored: git lists every one of them
        subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    expected = ["pkg/mod.py", "run.sh", "src/build/__init__.py"]
    if in_git:  # the top-level build outputs are git's to ignore
        expected = ["build/lib/pkg/mod.py", "dist/pkg.whl", *expected]
    assert names_in(workspace.pack(root)[0]) == expected


def test_a_subdirectory_of_a_git_work_tree_packs_relative_to_itself(tmp_path):
    root = make_tree(tmp_path / "repo")
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    data, _ = workspace.pack(root / "pkg")
    assert names_in(data) == ["mod.py"]


async def test_a_workspace_round_trips_through_the_object_store_and_is_cached(js, tmp_path):
    data, ref = workspace.pack(make_tree(tmp_path / "src"))
    assert await workspace.upload(js._nc, js, "alice", data, ref) is True
    assert await workspace.upload(js._nc, js, "alice", data, ref) is False  # already there: stored once

    cache = tmp_path / "cache"
    path = await workspace.materialize(js, "alice", ref, cache)
    assert path == cache / "alice" / ref.sha256
    assert (path / "pkg" / "mod.py").read_text() == "X = 1\n"
    assert os.access(path / "run.sh", os.X_OK)

    store = await js.object_store(topology.workspaces_bucket("alice"))
    await store.delete(ref.sha256)
    assert await workspace.materialize(js, "alice", ref, cache) == path  # a cache hit needs no store
    assert sorted(p.name for p in (cache / "alice").iterdir()) == [ref.sha256]  # no temporary leftovers


async def test_a_workspace_missing_from_the_store_is_a_data_error(js, tmp_path):
    ref = WorkspaceRef(sha256="a" * 64, size=10, files=1)
    with pytest.raises(workspace.WorkspaceError) as caught:
        await workspace.materialize(js, "alice", ref, tmp_path / "cache")
    assert caught.value.category == "data"


async def test_an_archive_whose_bytes_do_not_match_its_name_is_refused(js, tmp_path):
    data, ref = workspace.pack(make_tree(tmp_path / "src"))
    wrong = "b" * 64
    await buckets.create(js, topology.workspaces_bucket("alice"))
    store = await js.object_store(topology.workspaces_bucket("alice"))
    await store.put(wrong, data)
    with pytest.raises(workspace.WorkspaceError, match="hash check") as caught:
        await workspace.materialize(js, "alice", WorkspaceRef(sha256=wrong, size=ref.size, files=ref.files), tmp_path / "c")
    assert caught.value.category == "data"
    assert not (tmp_path / "c" / "alice" / wrong).exists()


@pytest.mark.parametrize("member", ["../escape.txt", "/etc/owned.txt", "ok/../../escape.txt"])
async def test_an_archive_with_a_member_outside_the_workspace_is_refused(js, tmp_path, member):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo(member)
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    data = raw.getvalue()
    ref = WorkspaceRef(sha256=hashlib.sha256(data).hexdigest(), size=len(data), files=1)
    await workspace.upload(js._nc, js, "alice", data, ref)
    with pytest.raises(workspace.WorkspaceError, match="escapes") as caught:
        await workspace.materialize(js, "alice", ref, tmp_path / "cache")
    assert caught.value.category == "data"
    assert not (tmp_path / "escape.txt").exists()
    assert not (tmp_path / "cache" / "alice" / ref.sha256).exists()


async def test_an_archive_with_a_symlink_is_refused(js, tmp_path):
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w:gz") as tar:
        info = tarfile.TarInfo("link")
        info.type = tarfile.SYMTYPE
        info.linkname = "/etc/passwd"
        tar.addfile(info)
    data = raw.getvalue()
    ref = WorkspaceRef(sha256=hashlib.sha256(data).hexdigest(), size=len(data), files=1)
    await workspace.upload(js._nc, js, "alice", data, ref)
    with pytest.raises(workspace.WorkspaceError, match="not a regular file"):
        await workspace.materialize(js, "alice", ref, tmp_path / "cache")
