"""What every command shares: where NATS is (flag, environment, current context), connecting with
clear errors and exit codes, and running a long-lived service until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from urllib.parse import urlsplit

import click
from nats.aio.client import Client

from dtf.streams import bus


EXIT_FAILED = 1
EXIT_USAGE = 2
EXIT_PERMISSION = 3


class CliError(click.ClickException):
    """A one-line error with an exit code CI can act on."""

    def __init__(self, message: str, exit_code: int = EXIT_USAGE) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def show(self, file=None) -> None:  # noqa: ANN001 - click's signature
        click.echo(f"dtf: {self.format_message()}", err=True)


def state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "dtf"


def current_context_file() -> Path:
    return state_dir() / "current.json"


def read_context(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot read context {path}: {exc}") from None


def resolve_url(flag: str | None) -> str:
    """--nats, then $DTF_NATS_URL, then the current context written by `dtf up`."""
    if flag:
        return flag
    if os.environ.get("DTF_NATS_URL"):
        return os.environ["DTF_NATS_URL"]
    pointer = current_context_file()
    if pointer.exists():
        context = read_context(Path(read_context(pointer)["context"]))
        return context["nats_url"]
    raise CliError("no NATS server given: pass --nats URL, set DTF_NATS_URL, or start one with `dtf up`")


def nats_options(func: Callable) -> Callable:
    func = click.option("--creds", envvar="DTF_CREDS", type=click.Path(dir_okay=False),
                        help="NATS credentials file (default $DTF_CREDS).")(func)
    return click.option("--nats", "nats_url", metavar="URL",
                        help="NATS server URL (default $DTF_NATS_URL, then the current `dtf up` context).")(func)


@contextlib.asynccontextmanager
async def connected(nats_url: str | None, creds: str | None, name: str) -> AsyncIterator[Client]:
    url = resolve_url(nats_url)
    try:
        await _probe(url)
        nc = await bus.connect(url, name=name, creds=creds)
    except Exception as exc:  # nats-py raises a zoo of types for "could not connect"
        raise CliError(f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from None
    try:
        yield nc
    finally:
        with contextlib.suppress(Exception):
            await nc.drain()


async def _probe(url: str) -> None:
    """nats-py retries an unreachable first server for as long as it would reconnect (forever for
    our services), so a CLI command checks that one of the servers listens before connecting."""
    error: Exception = OSError("no server in the URL")
    for server in (u.strip() for u in url.split(",") if u.strip()):
        parsed = urlsplit(server if "://" in server else f"nats://{server}")
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222), 3)
        except (OSError, TimeoutError) as exc:
            error = exc
            continue
        writer.close()
        return
    raise error


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("nats").setLevel(logging.WARNING if not verbose else logging.DEBUG)


def serve(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a service coroutine on one loop until SIGINT/SIGTERM sets its stop event; exit 0."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await main(stop)

    asyncio.run(runner())


def serve_with_nats(
    nats_url: str | None, creds: str | None, name: str,
    body: Callable[[Client, asyncio.Event], Awaitable[None]],
) -> None:
    """A service process: connect (reconnecting forever), run `body` until a signal, drain."""
    url = resolve_url(nats_url)

    async def main(stop: asyncio.Event) -> None:
        nc = await bus.connect(url, name=name, creds=creds)
        try:
            await body(nc, stop)
        finally:
            with contextlib.suppress(Exception):
                await nc.drain()

    serve(main)


def parse_pairs(pairs: tuple[str, ...], flag: str) -> dict[str, str]:
    """k=v flags into a dict, with a usage error naming the bad one."""
    result = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=flag)
        result[key.strip()] = value.strip()
    return result
