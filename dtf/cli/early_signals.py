"""SIGINT/SIGTERM from the very first moment of a `dtf` process. Importing the CLI takes seconds on a
busy machine, and a stop signal in that time would kill a service the hard way (exit -15) instead of
the documented clean stop. So the program holds stop signals before its slow imports, until the
command takes over (`common.serve`: the service stops at once, exit 0) or lets go (any other command:
the default action, as if the signal came now). Standard library only: it runs before the rest."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

SIGNALS = (signal.SIGINT, signal.SIGTERM)
DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}

_held: list[int] = []
_holding = False


def _hold(signum: int, frame: object) -> None:
    _held.append(signum)


def is_the_dtf_program() -> bool:
    """The process is `dtf` itself (the console script or `python -m dtf`), not a test runner or a
    library importing the CLI, whose own signal handling must be left alone."""
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None:
        return spec.name == "dtf.__main__"
    return Path(getattr(main, "__file__", "") or "").name == "dtf"


def hold() -> None:
    """Note stop signals instead of acting on them, from now until `release` or a service's loop."""
    global _holding
    if not is_the_dtf_program():
        return
    for sig in SIGNALS:
        signal.signal(sig, _hold)
    _holding = True


def held() -> bool:
    """A stop signal came while held: the service that takes over should stop straight away."""
    return bool(_held)


def release() -> None:
    """Give a command that does not serve the default handlers back, delivering a held signal."""
    global _holding
    if not _holding:
        return
    _holding = False
    for sig in SIGNALS:
        signal.signal(sig, DEFAULTS[sig])
    if _held:
        signal.raise_signal(_held[0])
