"""Access control (#7): `dtf creds add|revoke|list` — users per role for the system `dtf up` runs.

Run on the machine that runs `dtf up` (it writes that system's users.conf and tells its nats-server to
reload); hand the file it writes to the person or machine it is for. See dtf.streams.auth for the roles.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from dtf.cli.common import CliError, current_context_file, read_context
from dtf.streams import auth


def _system(data_dir: Path | None) -> tuple[auth.Registry, list[Path]]:
    """The users registry and nats-server pid files of the system in `data_dir` (default: the
    current context's)."""
    if data_dir is not None:
        context_file = data_dir / "context.json"
        context = read_context(context_file) if context_file.exists() else {}
        auth_dir = Path(context.get("auth_dir") or data_dir / "auth")
    else:
        pointer = current_context_file()
        if not pointer.exists():
            raise CliError("no running `dtf up` found: pass --data-dir DIR (the data dir of the system)")
        context = read_context(Path(read_context(pointer)["context"]))
        if not context.get("auth_dir"):
            raise CliError("the current system runs without auth (dtf up --no-auth); nothing to add to")
        auth_dir = Path(context["auth_dir"])
    return auth.Registry(auth_dir), [Path(p) for p in context.get("nats_pid_files", [])]


@click.group()
def creds() -> None:
    """Credentials: one nkey per person or machine, with a role (submitter, worker, coordinator,
    projector, viewer, admin)."""


@creds.command("add")
@click.option("--role", required=True, type=click.Choice(auth.ROLES), help="What the holder may do.")
@click.option("--name", required=True,
              help="Its identity: the submitter name or worker id it may publish under.")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the credentials (mode 0600); it must not exist.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The system's data dir (default: the current `dtf up` context).")
def add(role: str, name: str, out: Path, data_dir: Path | None) -> None:
    """Issue credentials for ROLE as NAME; the running server accepts them at once (no restart)."""
    if out.exists():
        raise CliError(f"{out} exists; credentials are never overwritten (remove it first)")
    registry, pid_files = _system(data_dir)
    try:
        user = registry.add(role, name, out)
    except auth.AuthError as exc:
        raise click.BadParameter(str(exc), param_hint="--role/--name") from None
    reloaded = auth.reload(pid_files)
    note = (f"the server reloaded ({len(reloaded)} node(s))" if reloaded
            else "no running server to reload; it applies at the next start")
    click.echo(f"dtf: {out}: {role} {name} ({user.public_key}); {note}", err=True)
    click.echo(f"export DTF_CREDS={out.resolve()}")


@creds.command("revoke")
@click.option("--name", required=True, help="Whose keys to forget.")
@click.option("--role", type=click.Choice(auth.ROLES), help="Only its keys in this role.")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The system's data dir (default: the current `dtf up` context).")
def revoke(name: str, role: str | None, data_dir: Path | None) -> None:
    """Withdraw NAME's credentials: the server reloads, drops its connections and refuses it."""
    registry, pid_files = _system(data_dir)
    gone = registry.revoke(name, role)
    if not gone:
        raise CliError(f"no credentials for {name}" + (f" as {role}" if role else ""))
    reloaded = auth.reload(pid_files)
    click.echo(f"dtf: revoked {len(gone)} key(s) of {name}; "
               + (f"the server reloaded ({len(reloaded)} node(s))" if reloaded else "no running server"), err=True)


@creds.command("list")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path),
              help="The system's data dir (default: the current `dtf up` context).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_users(data_dir: Path | None, as_json: bool) -> None:
    """The users the system knows (public keys only; no secret is kept besides the local ones)."""
    registry, _ = _system(data_dir)
    users = registry.users()
    if as_json:
        click.echo(json.dumps({"users": [vars(u) for u in users]}))
        return
    for user in users:
        click.echo(f"{user.role:<12} {user.name:<24} {user.public_key}")


COMMANDS: list[click.Command] = [creds]
