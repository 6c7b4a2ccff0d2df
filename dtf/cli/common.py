"""What every command shares: where NATS is (flag, environment, current context), connecting with
clear errors and exit codes, and running a long-lived service until SIGINT/SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import ssl
import sys
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar
from pathlib import Path
from urllib.parse import urlsplit

import click
import tenacity
from nats.aio.client import Client

from dtf.cli import early_signals
from dtf.cli.submit import submitter_name
from dtf.streams import auth, bus, retry
from dtf.streams.retry import is_auth_refusal

T = TypeVar("T")


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
    return resolve_connection(flag, None)[0]


def resolve_connection(flag: str | None, creds: str | None) -> tuple[str, dict, str | None]:
    """Where NATS is, how to connect to it (credentials, CA) and the credentials file chosen. A URL from --nats or $DTF_NATS_URL
    takes its credentials from --creds/$DTF_CREDS only; without one, the current context written by
    `dtf up` gives the URL, its credentials (unless --creds) and its CA ($DTF_CA overrides the CA)."""
    url = flag or os.environ.get("DTF_NATS_URL")
    ca = os.environ.get("DTF_CA") or None
    if not url:
        pointer = current_context_file()
        if not pointer.exists():
            raise CliError("no NATS server given: pass --nats URL, set DTF_NATS_URL, or start one with `dtf up`")
        context = read_context(Path(read_context(pointer)["context"]))
        url, creds, ca = context["nats_url"], creds or context.get("creds"), ca or context.get("ca")
    try:
        return url, auth.client_options(creds, ca), creds
    except (auth.AuthError, OSError, ssl.SSLError) as exc:
        raise CliError(str(exc)) from None


_query_scopes: weakref.WeakKeyDictionary[Client, str] = weakref.WeakKeyDictionary()


def query_scope(nc: Client) -> str | None:
    """The submitter a connection's read-model queries are scoped to (`dtf.query.<name>.<submitter>`),
    or None when it may ask unscoped: a submitter may read only its own runs (see dtf.streams.auth)."""
    return _query_scopes.get(nc)


_acting: weakref.WeakKeyDictionary[Client, str] = weakref.WeakKeyDictionary()


def acting_as(nc: Client) -> str:
    """`acting_name` of the credentials a connection was made with (the current context's included)."""
    return _acting.get(nc) or submitter_name()


def credential_identity(creds: str | None) -> auth.Credentials | None:
    """The role and name a dtf credentials file is for (None without one, or for a NATS JWT file)."""
    if not creds:
        return None
    try:
        identity = auth.read_credentials(creds)
    except auth.AuthError as exc:
        raise CliError(str(exc)) from None
    return identity if identity.role else None


def service_name(creds: str | None, role: str, given: str | None, flag: str) -> str | None:
    """The name a service runs under: with `role`'s credentials the name in them, the only one the
    server grants it (a different `given` is refused, exit 3); otherwise `given`."""
    identity = credential_identity(creds)
    if identity is None or identity.role != role:
        return given
    if given and given != identity.name:
        raise CliError(f"{creds} are {role} {identity.name}'s credentials: run with {flag} {identity.name}",
                       EXIT_PERMISSION)
    return identity.name


def acting_name(creds: str | None) -> str:
    """Who a command acts as (the last token of what it publishes): the name in a submitter's
    credentials, the only one the server lets it publish under, or in an admin's, the only
    workspaces bucket of an admin's that workers may read (dtf.streams.auth); otherwise the login name."""
    identity = credential_identity(creds)
    named = identity is not None and identity.role in ("submitter", "admin")
    return identity.name if named else submitter_name()


def nats_options(func: Callable) -> Callable:
    func = click.option("--creds", envvar="DTF_CREDS", type=click.Path(dir_okay=False),
                        help="NATS credentials file (default $DTF_CREDS).")(func)
    return click.option("--nats", "nats_url", metavar="URL",
                        help="NATS server URL (default $DTF_NATS_URL, then the current `dtf up` context).")(func)


def is_permission_error(exc: BaseException) -> bool:
    """The server refused: a permissions violation (publish/subscribe) or a rejected login."""
    text = str(exc).lower()
    return "permissions violation" in text or "authorization violation" in text


@contextlib.asynccontextmanager
async def connected(nats_url: str | None, creds: str | None, name: str) -> AsyncIterator[Client]:
    """A connection for one CLI action. A permissions violation the server reports (asynchronously:
    a refused publish would otherwise just time out) ends the action at once with exit code 3."""
    url, options, creds = resolve_connection(nats_url, creds)
    identity = credential_identity(creds)
    action = asyncio.current_task()
    refused: list[str] = []
    untrusted: list[ssl.SSLError] = []

    async def on_error(exc: Exception) -> None:
        if is_permission_error(exc) and not refused:
            refused.append(str(exc).removeprefix("nats: "))
        elif isinstance(exc, ssl.SSLError) and not untrusted:  # nats-py would retry it forever
            untrusted.append(exc)
        else:
            return
        if action is not None:
            action.cancel()

    try:
        await _probe(url)
        nc = await bus.connect(url, name=name, error_cb=on_error, **options)
    except (Exception, asyncio.CancelledError) as exc:  # nats-py raises a zoo of types for "could not connect"
        if refused or is_permission_error(exc):  # a refused login: nats-py would retry it forever
            given = "nkeys_seed_str" in options or "user_credentials" in options
            which = "these credentials" if given else "a client without credentials (--creds, $DTF_CREDS)"
            raise CliError(f"NATS at {url} refused {which}", EXIT_PERMISSION) from None
        if untrusted:
            raise CliError(f"cannot reach NATS at {url}: TLS: {untrusted[0]} (is its CA in $DTF_CA?)") from None
        if isinstance(exc, asyncio.CancelledError):
            raise
        raise CliError(f"cannot reach NATS at {url}: {exc or type(exc).__name__}") from None
    if identity is not None and identity.role == "submitter":
        _query_scopes[nc] = identity.name
    _acting[nc] = acting_name(creds)
    try:
        yield nc
    except asyncio.CancelledError:
        if refused:
            raise CliError(f"permission denied by the server: {refused[0]}", EXIT_PERMISSION) from None
        raise
    except Exception:
        if refused:  # the refusal surfaced as some other failure first (a timeout, no responders)
            raise CliError(f"permission denied by the server: {refused[0]}", EXIT_PERMISSION) from None
        raise
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
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that meets a refused
            # connect (the inner error wins), and a stop signal then never ends the retry loop.
            async with asyncio.timeout(3):
                _, writer = await asyncio.open_connection(parsed.hostname or "127.0.0.1", parsed.port or 4222)
        except (OSError, TimeoutError) as exc:
            error = exc
            continue
        writer.close()
        return
    raise error


async def until_reachable(url: str) -> None:
    """A service waits for NATS to listen, backing off exponentially with jitter (0.5 s up to 10 s)
    and logging each failed attempt, instead of nats-py's silent fixed 0.5 s loop; the caller
    cancels it on a stop signal."""
    async for attempt in tenacity.AsyncRetrying(
        retry=tenacity.retry_if_exception_type(OSError), wait=retry.backoff(), before_sleep=retry.log_attempt,
    ):
        with attempt:
            await _probe(url)


def setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    logging.getLogger("nats").setLevel(logging.WARNING if not verbose else logging.DEBUG)


def serve(main: Callable[[asyncio.Event], Awaitable[None]]) -> None:
    """Run a service coroutine on one loop until SIGINT/SIGTERM sets its stop event; exit 0. A
    signal that came while the process started (held by early_signals) stops it at once."""

    async def runner() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in early_signals.SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        if early_signals.held():
            stop.set()
        await main(stop)

    asyncio.run(runner())


class Stopped(Exception):
    """The event came before the work finished (the work was cancelled)."""


async def unless_set(work: Awaitable[T], event: asyncio.Event) -> T:
    """`work`'s result, or Stopped if `event` is set first; `work` is then cancelled and awaited."""
    job = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({job, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
    if job.cancelled() and event.is_set():
        raise Stopped
    return job.result()


CUT_SHORT_POLL_S = 0.2


async def until_stopped_or_cut_short(work: Awaitable[None], stop: asyncio.Event,
                                     connected_now: Callable[[], bool], gone: asyncio.Event | None = None) -> None:
    """Run a service's body; once `stop` is set it shuts down in its own orderly way (hand work
    back, publish that it left) while NATS is there to take it. With NATS gone, nothing it would
    publish can land and its publishes would retry for a long time, so it is cancelled at once;
    so it is when `gone` is set (the client closed for good)."""
    job = asyncio.ensure_future(work)
    watchers = [asyncio.ensure_future(stop.wait()), *([asyncio.ensure_future(gone.wait())] if gone else [])]
    try:
        await asyncio.wait({job, *watchers}, return_when=asyncio.FIRST_COMPLETED)
        while not job.done():
            if not connected_now():
                job.cancel()
                break
            await asyncio.wait({job}, timeout=CUT_SHORT_POLL_S)
        await asyncio.gather(job, return_exceptions=True)
    finally:
        for watcher in watchers:
            watcher.cancel()
        job.cancel()
    if not job.cancelled() and job.exception() is not None:
        raise job.exception()


RECONNECT_ATTEMPTS = 30
"""How often nats-py itself tries to reconnect a service, 0.5 s apart: about 15 s, the coordinator's
default heartbeat timeout, after which a worker counts as lost anyway. Then the client closes and
the service connects afresh with the logged back-off ($DTF_RECONNECT_ATTEMPTS overrides it)."""


def reconnect_attempts() -> int:
    try:
        return max(1, int(os.environ.get("DTF_RECONNECT_ATTEMPTS", RECONNECT_ATTEMPTS)))
    except ValueError:
        raise CliError(f"DTF_RECONNECT_ATTEMPTS={os.environ['DTF_RECONNECT_ATTEMPTS']!r} is not a number") from None


def serve_with_nats(
    nats_url: str | None, creds: str | None, name: str,
    body: Callable[[Client, asyncio.Event], Awaitable[None]],
) -> None:
    """A service process: connect, run `body` until a signal, drain. When the client gives up for
    good (its reconnects ran out, or the server closed the connection), the body is cancelled and
    run again on a new connection, after the same back-off as the first connect, so it resumes from
    its durable consumers. Refused credentials, at the first connect or any later one, exit 3."""
    url, options, _ = resolve_connection(nats_url, creds)
    attempts = reconnect_attempts()
    log = logging.getLogger("dtf.service")

    async def main(stop: asyncio.Event) -> None:
        refused: list[str] = []

        async def on_error(exc: Exception) -> None:
            if is_auth_refusal(exc):  # nats-py would retry a refused login forever
                refused.append(str(exc) or type(exc).__name__)
                stop.set()

        log.info("%s: connecting to %s", name, url)  # what a user sees first; SIGTERM works from here on
        losses = 0  # connections in a row lost soon after they were made
        loop = asyncio.get_running_loop()
        while not stop.is_set():
            gone = asyncio.Event()

            async def on_closed(gone: asyncio.Event = gone) -> None:
                gone.set()

            # Connecting races the stop signal: with NATS down or refusing, a SIGTERM still ends the process.
            async def connect() -> Client:
                await until_reachable(url)
                return await bus.connect(url, name=name, error_cb=on_error, closed_cb=on_closed,
                                         max_reconnect_attempts=attempts, **options)

            try:
                nc = await unless_set(connect(), stop)
            except Stopped:
                break
            except Exception as exc:  # noqa: BLE001 - it listened, then nats-py ran out of attempts
                log.warning("%s: cannot connect to %s (%s); trying again", name, url, exc or type(exc).__name__)
                continue
            log.info("%s: connected to %s", name, nc.connected_url.netloc if nc.connected_url else url)
            since = loop.time()
            try:
                await until_stopped_or_cut_short(body(nc, stop), stop, lambda: nc.is_connected, gone)
            except Exception:
                if not nc.is_closed or stop.is_set():
                    raise
                # The body tripped over the closed client before the close was signalled: same as below.
            finally:
                lost = nc.is_closed and not stop.is_set()  # closed by the server or nats-py, not by us
                with contextlib.suppress(Exception):
                    await (nc.drain() if nc.is_connected else nc.close())  # drain would wait on a dead link
            if is_auth_refusal(nc.last_error or Exception()):  # the server closed us with a refusal
                refused.append(str(nc.last_error) or type(nc.last_error).__name__)
            if refused or not lost:
                break  # refused, stopped, or the body ended on its own (a worker leaving when idle)
            # A server that closes each new connection at once (a body breaking a limit) is not hammered.
            losses = 1 if loop.time() - since > retry.BACKOFF_MAX else losses + 1
            delay = retry.pause(losses)
            log.warning("%s: connection to %s closed for good (%s); connecting again in %.1fs", name, url,
                        nc.last_error or "no error given", delay)
            with contextlib.suppress(Stopped):
                await unless_set(asyncio.sleep(delay), stop)
        if refused:
            raise CliError(f"NATS at {url} refused these credentials: {refused[0]}", EXIT_PERMISSION)

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
