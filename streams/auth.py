"""Who may publish and read what: dtf's roles as nats-server permissions, and the credentials for them.

**Mechanism: nkey users in the server config.** Each identity is an ed25519 key pair (an NATS "nkey").
The server's config holds only the public keys and their permissions (`users.conf`, included by
nats-server.conf), so no secret is in any config file, committed or not; the client holds the seed
(in a credentials file that also names its role and name, mode 0600) and signs the server's nonce
with it. Chosen over user/password (the
server would hold a secret or a bcrypt hash per user, and the password crosses the wire) and over
JWT accounts (an operator, account and resolver to run: more moving parts than a single team's system
needs). A new user takes effect on a config reload (SIGHUP), without restarting the server.

**Identity lives in the subject.** NATS stamps no publisher on a message and a JSON field can be
forged, so each event's subject ends with the party it is from or for (`dtf.subjects`), and each
user may publish only under its own name:

    role         publishes                                           reads
    submitter    dtf.task.*.*.submitted.<name>, cancelled.<name>     its own feed, dtf.feed.<name>.> in
                 its own workspaces bucket dtf-ws-<name> (no purge)  DTF_FEED; dtf.query.*.<name> (its
                 dtf.bucket.ws.<name> (asks for that bucket)         own scope, its own tasks' logs);
                                                                     live logs dtf.log.<name>.>
    worker       dtf.task.*.*.{started,result,failed,released}.<id>  its own durable consumer worker-<id>,
                 dtf.worker.<id>.{registered,left}, dtf.hb.<id>,     cancellations, preemptions of its own,
                 dtf.log.*.*.<id>, its own bucket dtf-artifacts-<id>, the task history, every submitter's
                 dtf.bucket.artifacts.<id>                           workspaces bucket
    coordinator  dtf.task.>, dtf.worker.> (its verdicts),            everything; answers dtf.bucket.>
                 dtf.feed.> (each run again for its owner), provisions (makes owners' buckets)
    projector    nothing on dtf.*; answers dtf.query.> (replies only) both streams, every worker's artifacts
    detector     dtf.task.*.*.{regression,anomaly}.detector          the task history, every worker's artifacts
    viewer       nothing on dtf.* but queries                        both streams, every worker's artifacts,
                                                                     live logs
    admin        everything                                          everything

Object stores are pinned by bucket, one per owner (dtf.streams.buckets): an object's subjects name
no owner a permission could match. So a user's permissions name the exact buckets it may read,
which is why `permissions` takes every user the server knows: a worker reads each submitter's (and
admin's) workspaces bucket, the readers of results each worker's artifacts bucket, and adding or
revoking a user renders everyone's permissions again (`Registry._save`, then a reload).

A submitter does not read DTF_EVENTS: JetStream's consumer filter is in the request body, where a
permission cannot see it, and a run's subjects name no submitter, so read access to the task history
would be access to everyone's results. It follows its own runs in DTF_FEED instead, where the
coordinator republishes each run's events under its owner's name (dtf.streams.feed): there it may
create consumers only through the filtered create subject with its own prefix, which the server
checks against the filter in the body. Its reports come from the projector's query service on
`dtf.query.<query>.<name>`, the only query subjects it may publish to, which the service scopes to that
submitter's runs (and its stored logs, which the projector reads from the artifacts store for it). Replies come back on a per-user inbox prefix (`_INBOX.<public key>`), which only that
user may subscribe to, so no one can listen in on another's replies.

**Consumer names are pinned too.** A consumer's name is in the create subject only in the named
forms, and wildcards match whole tokens, so names are granted exactly: a worker its durable
`worker-<id>`, a projector `<name>` and `<name>-hb`, every reader its own pool of ordered-consumer
names on each stream it reads (`r-<public key>-<k>`, `f-...` on DTF_FEED; dtf.streams.reader). No
role but coordinator and admin may send the bare `$JS.API.CONSUMER.CREATE.<stream>` on dtf's
streams, so no one can create, update or delete a consumer by another's name.
"""

from __future__ import annotations

import json
import os
import signal
import ssl
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import nkeys

from dtf.spec import TOKEN_RE
from dtf.streams import reader, topology

ROLES = ("submitter", "worker", "coordinator", "projector", "detector", "viewer", "admin")
EVENTS = "DTF_EVENTS"
FEED = "DTF_FEED"
HEARTBEATS = "DTF_HEARTBEATS"
WORKSPACES_PREFIX = "dtf-ws-"
ARTIFACTS_PREFIX = "dtf-artifacts-"
WORKER_PUBLISHES = ("started", "result", "failed", "released")


class AuthError(ValueError):
    pass


# --- permissions ----------------------------------------------------------------------------------


def inbox_prefix(public_key: str) -> str:
    """Where a user's request replies (JetStream API answers included) arrive; only it may listen."""
    return f"_INBOX.{public_key}"


def _stream_read(stream: str, key: str) -> list[str]:
    """JetStream API subjects to look at one of dtf's streams and read it through ordered consumers:
    a reader may create (and delete) consumers only under the names of its own pool (`key`, its
    public key: dtf.streams.reader), never on the bare CONSUMER.CREATE subject, whose consumer name
    is in the request body, where no permission can see it."""
    return [*_look(stream), *_readers(stream, reader.pool(reader.READER, key), ">")]


def _look(stream: str) -> list[str]:
    """Stream info and single-message reads. No CONSUMER.INFO: an ordered reader learns its consumer
    from the create reply, and another's consumer info would show its filter (a submitter's name)
    and how far it has read."""
    return [f"$JS.API.STREAM.INFO.{stream}", f"$JS.API.STREAM.MSG.GET.{stream}", f"$JS.API.DIRECT.GET.{stream}",
            f"$JS.API.DIRECT.GET.{stream}.>"]


def _readers(stream: str, names: list[str], filter_: str) -> list[str]:
    """Create, under each of `names` and only on `filter_` (">": any), an ordered consumer, and delete it."""
    subjects = []
    for name in names:
        create = f"$JS.API.CONSUMER.CREATE.{stream}.{name}"
        subjects += [*([create] if filter_ == ">" else []), f"{create}.{filter_}", f"$JS.API.CONSUMER.DELETE.{stream}.{name}"]
    return subjects


def _bucket_read(bucket: str) -> list[str]:
    """An object's metadata and chunks are single-message reads (dtf.streams.objects): no consumer."""
    return _look(f"OBJ_{bucket}")


def _bucket_write(bucket: str, overwrite: bool) -> list[str]:
    """Put objects (chunks and metadata) into one's own bucket. Overwriting one purges its old
    chunks, so only a role whose uploads may repeat (a worker's log of a redelivered attempt) gets
    the purge, of its own bucket; workspaces are named by content and uploaded once, and the worker
    checks the hash of what it fetches."""
    purge = [f"$JS.API.STREAM.PURGE.OBJ_{bucket}"] if overwrite else []
    return [*_bucket_read(bucket), f"$O.{bucket}.>", *purge]


def _names(users: Iterable[User], *roles: str) -> list[str]:
    return sorted({u.name for u in users if u.role in roles})


def _workspaces_read(users: Iterable[User]) -> list[str]:
    """Every workspaces bucket a run's owner may have: each submitter's, and each admin's (an admin
    submits under its credentials' name)."""
    return [s for owner in _names(users, "submitter", "admin") for s in _bucket_read(f"{WORKSPACES_PREFIX}{owner}")]


def _artifacts_read(users: Iterable[User]) -> list[str]:
    return [s for worker in _names(users, "worker") for s in _bucket_read(f"{ARTIFACTS_PREFIX}{worker}")]


def _durable(stream: str, name: str) -> list[str]:
    """Create, bind, fetch from and acknowledge one durable consumer, by its exact name."""
    return [
        f"$JS.API.CONSUMER.CREATE.{stream}.{name}", f"$JS.API.CONSUMER.CREATE.{stream}.{name}.>",
        f"$JS.API.CONSUMER.DURABLE.CREATE.{stream}.{name}", f"$JS.API.CONSUMER.INFO.{stream}.{name}",
        f"$JS.API.CONSUMER.DELETE.{stream}.{name}", f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{name}",
        f"$JS.ACK.{stream}.{name}.>",
    ]


def _own_feed(name: str, key: str) -> list[str]:
    """Read one's own runs from DTF_FEED: only the filtered create form, whose subject carries the
    filter (the server checks it against the body), only with one's own prefix, and only under the
    names of one's own feed pool, so no submitter can take over another's feed consumer."""
    return _readers(FEED, reader.pool(reader.FEED_READER, key), f"dtf.feed.{name}.>")


RESERVED_PROJECTOR_NAMES = ("worker-", f"{reader.READER}-", f"{reader.FEED_READER}-")
"""A projector's durables are named after it: none may be a worker's or a pool name."""


COMMON_PUBLISH = ["$JS.API.INFO", "$JS.API.STREAM.NAMES", "$JS.FC.>"]
"""Account info and stream lookup by subject (client checks, object-store reads), and flow-control
replies of the push consumers a reader makes."""


def permissions(role: str, name: str, public_key: str, users: Iterable[User] = ()) -> dict:
    """The nats-server `permissions` block for one user; `users` are all the server knows (whose
    buckets readers may read)."""
    users = list(users)
    if role not in ROLES:
        raise AuthError(f"unknown role {role!r} (roles: {', '.join(ROLES)})")
    if not TOKEN_RE.match(name):
        raise AuthError(f"{name!r} is not a usable name: letters, digits, _ and - only (at most 80)")
    inbox = f"{inbox_prefix(public_key)}.>"
    if role == "admin":
        return {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    publish, subscribe, extra = list(COMMON_PUBLISH), [inbox], {}
    if role == "submitter":
        publish += [f"dtf.task.*.*.submitted.{name}", f"dtf.task.*.*.cancelled.{name}", f"dtf.query.*.{name}",
                    *_own_feed(name, public_key), f"dtf.bucket.ws.{name}",
                    *_bucket_write(f"{WORKSPACES_PREFIX}{name}", overwrite=False)]
        subscribe.append(f"dtf.log.{name}.>")
    elif role == "worker":
        publish += [f"dtf.task.*.*.{kind}.{name}" for kind in WORKER_PUBLISHES]
        publish += [f"dtf.worker.{name}.registered", f"dtf.worker.{name}.left", f"dtf.hb.{name}",
                    f"dtf.log.*.*.{name}", f"dtf.bucket.artifacts.{name}",
                    *_durable(EVENTS, topology.worker_consumer(name).durable_name),
                    *_stream_read(EVENTS, public_key),  # is an assignment stale?
                    *_workspaces_read(users), *_bucket_write(f"{ARTIFACTS_PREFIX}{name}", overwrite=True)]
        subscribe += ["dtf.task.*.*.cancelled.*", f"dtf.task.*.*.preempted.{name}"]
    elif role == "coordinator":
        publish += ["dtf.task.>", "dtf.worker.>", "dtf.feed.>", "$JS.API.>", "$JS.ACK.>", "$O.>"]
        subscribe.append("dtf.bucket.>")
        extra = {"allow_responses": True}  # answers bucket requests
    elif role == "projector":
        if name.startswith(RESERVED_PROJECTOR_NAMES) or name == "worker":
            raise AuthError(f"{name!r} cannot name a projector: its durables would be a worker's or a reader's "
                            f"(names starting {', '.join(RESERVED_PROJECTOR_NAMES)} are taken)")
        publish += [*_stream_read(EVENTS, public_key), *_stream_read(HEARTBEATS, public_key),
                    *_artifacts_read(users), *_durable(EVENTS, topology.projector_consumer(name).durable_name),
                    *_durable(HEARTBEATS, topology.projector_heartbeats_consumer(name).durable_name)]
        subscribe.append("dtf.query.>")
        extra = {"allow_responses": True}  # it answers queries, and may publish nothing else
    elif role == "detector":
        publish += ["dtf.task.*.*.regression.detector", "dtf.task.*.*.anomaly.detector",
                    *_stream_read(EVENTS, public_key), *_artifacts_read(users)]
    elif role == "viewer":
        publish += ["dtf.query.>", *_stream_read(EVENTS, public_key), *_stream_read(HEARTBEATS, public_key),
                    *_artifacts_read(users)]
        subscribe.append("dtf.log.>")
    return {"publish": {"allow": publish}, "subscribe": {"allow": subscribe}, **extra}


# --- keys and files -------------------------------------------------------------------------------


def new_seed() -> bytes:
    """A fresh user nkey seed (the secret; `SU...`)."""
    return nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)


def public_key(seed: bytes) -> str:
    try:
        pair = nkeys.from_seed(bytearray(seed.strip()))
    except (nkeys.NkeysError, ValueError, TypeError) as exc:
        raise AuthError(f"not an nkey seed: {exc or type(exc).__name__}") from None
    try:
        return pair.public_key.decode()
    finally:
        pair.wipe()


def write_private(path: Path, data: bytes) -> Path:
    """Write a file only its owner can read (0600 from the start, not chmod-ed after)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        os.fchmod(handle.fileno(), 0o600)  # an existing file keeps its old mode through O_CREAT
        handle.write(data)
    return path


SEED_BEGIN, SEED_END = "-----BEGIN USER NKEY SEED-----", "------END USER NKEY SEED------"


def credentials_text(user: User, seed: bytes) -> bytes:
    """A dtf credentials file: who it is for (so a client knows the name it publishes under), then
    the seed in the armour NATS .creds files use."""
    return (
        f"# dtf credentials: role {user.role}, name {user.name}. Secret: keep it mode 0600, share it with no one.\n"
        f"role: {user.role}\nname: {user.name}\n\n{SEED_BEGIN}\n{seed.decode()}\n{SEED_END}\n"
    ).encode()


@dataclass(frozen=True)
class Credentials:
    role: str
    name: str
    seed: str


def read_credentials(path: str | os.PathLike[str]) -> Credentials:
    """The role, name and seed in a dtf credentials file (a bare seed file has neither role nor name)."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuthError(f"cannot read credentials {path}: {getattr(exc, 'strerror', None) or exc}") from None
    fields = dict(line.split(": ", 1) for line in text.splitlines() if line[:5] in ("role:", "name:"))
    seeds = [line.strip() for line in text.splitlines() if line.strip().startswith("SU")]
    if len(seeds) != 1:
        raise AuthError(f"{path} holds no user nkey seed")
    public_key(seeds[0].encode())  # says which file is broken rather than failing at connect time
    return Credentials(fields.get("role", ""), fields.get("name", ""), seeds[0])


def client_options(creds: str | os.PathLike[str] | None, ca: str | os.PathLike[str] | None = None) -> dict:
    """nats.connect keyword arguments for a credentials file and a CA to trust. The file is what
    `dtf creds add` writes (or a bare nkey seed), or a standard NATS .creds file (JWT + seed, for
    servers run in operator mode)."""
    options: dict = {}
    if creds:
        path = Path(creds)
        try:
            is_jwt = b"BEGIN NATS USER JWT" in path.read_bytes()
        except OSError as exc:
            raise AuthError(f"cannot read credentials {path}: {exc.strerror or exc}") from None
        if is_jwt:
            options["user_credentials"] = str(path)
        else:
            seed = read_credentials(path).seed
            options["nkeys_seed_str"] = seed
            options["inbox_prefix"] = inbox_prefix(public_key(seed.encode()))
    if ca:
        context = ssl.create_default_context(cafile=str(ca))
        options["tls"] = context
    return options


# --- the users a server knows ---------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    role: str
    name: str
    public_key: str


class Registry:
    """The users one dtf system knows, kept in `<dir>/users.json` (public keys only) and rendered to
    `<dir>/users.conf`, which nats-server.conf includes inside its `authorization` (or account) block.
    Credentials made for local processes go to `<dir>/creds/<role>-<name>.nk` (0600)."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.users_file = self.dir / "users.json"
        self.conf = self.dir / "users.conf"
        self.creds_dir = self.dir / "creds"

    def users(self) -> list[User]:
        try:
            return [User(**u) for u in json.loads(self.users_file.read_text())]
        except FileNotFoundError:
            return []

    def add(self, role: str, name: str, out: Path) -> User:
        """A new key pair for `name` in `role`: the seed to `out` (0600), the public key to the config.
        A name may hold several keys (one per machine); each is its own user."""
        permissions(role, name, "")  # validates role and name before anything is written
        seed = new_seed()
        user = User(role, name, public_key(seed))
        write_private(Path(out), credentials_text(user, seed))
        self._save([*self.users(), user])
        return user

    def ensure(self, role: str, name: str) -> Path:
        """The local credentials file for (role, name), made once and reused on every start."""
        path = self.creds_dir / f"{role}-{name}.creds"
        if path.exists():
            key = public_key(read_credentials(path).seed.encode())
            if any(u.public_key == key and u.role == role for u in self.users()):
                return path
        self.add(role, name, path)
        return path

    def revoke(self, name: str, role: str | None = None) -> list[User]:
        """Forget every key of `name` (in `role`, if given); after a reload the server drops their
        connections and refuses them. Returns the users removed."""
        users = self.users()
        gone = [u for u in users if u.name == name and role in (None, u.role)]
        if gone:
            self._save([u for u in users if u not in gone])
        return gone

    def refresh(self) -> None:
        """Render users.conf again from users.json: permissions follow this version of dtf."""
        self._save(self.users())

    def _save(self, users: list[User]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        write_private(self.users_file, (json.dumps([asdict(u) for u in users], indent=2) + "\n").encode())
        write_private(self.conf, render_users(users).encode())


def render_users(users: Iterable[User]) -> str:
    """The `users = [...]` lines nats-server includes (its config syntax accepts JSON values)."""
    users = list(users)
    entries = [
        {"nkey": u.public_key, "permissions": permissions(u.role, u.name, u.public_key, users)} for u in users
    ]
    header = "# written by dtf (streams/auth.py); public keys only. `dtf creds add` appends users.\n"
    return header + "users = " + json.dumps(entries, indent=2) + "\n"


def authorization_block(users_conf: Path, config_dir: Path) -> str:
    """The config block that loads the users; nats-server resolves an include against the including
    file's directory, so the path is made relative to `config_dir`."""
    relative = os.path.relpath(Path(users_conf).resolve(), Path(config_dir).resolve())
    return f"authorization {{\n  include {json.dumps(relative)}\n}}\n"


def reload(pid_files: Iterable[Path]) -> list[int]:
    """Ask each running nats-server (by its pid file) to re-read its config (SIGHUP = reload): new
    users apply at once, connected clients stay connected. Returns the pids signalled."""
    signalled = []
    for pid_file in pid_files:
        try:
            pid = int(Path(pid_file).read_text().strip())
            os.kill(pid, signal.SIGHUP)
        except (OSError, ValueError):
            continue
        signalled.append(pid)
    return signalled
