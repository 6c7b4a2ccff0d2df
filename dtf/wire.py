"""Bounded JSON decoding: every message dtf reads off the bus (events, query requests and replies,
stored test lists) is decoded here, so no input can raise anything but `WireError`.

msgspec (like Python's json) gives up on deep nesting with a RecursionError, at a depth that depends
on how deep the caller's own stack is: a message 900 levels deep may decode in a shallow replay and
fail in the coordinator. A fold must decide the same everywhere, so nesting is bounded here first, by
a scan that does not recurse: past `limits.MAX_DEPTH` levels a message is refused with that reason,
wherever it is read.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import msgspec

from dtf.limits import MAX_DEPTH


class WireError(ValueError):
    """The bytes cannot be decoded as asked; the message says why in one line."""


# A JSON string, or an unterminated one running to the end of the input; possessive, so the scan is
# linear even for input made of quotes and backslashes.
_STRING = re.compile(rb'"[^"\\]*+(?:\\.[^"\\]*+)*+(?:"|\\?\Z)', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")


def nesting_error(data: bytes, limit: int = MAX_DEPTH) -> str | None:
    """Why `data` nests too deep (None when it does not): how deep its brackets outside strings get
    (for unbalanced input, as deep as any prefix gets)."""
    if data.count(b"[") + data.count(b"{") <= limit:
        return None  # the common case: cannot nest deeper than it has brackets
    brackets = _STRING.sub(b"", data).translate(None, _NOT_BRACKETS)
    if brackets.count(b"[") + brackets.count(b"{") <= limit:
        return None
    # The deepest prefix, summed at C speed: +1 per opener, -1 per closer (as signed bytes).
    steps = memoryview(brackets.translate(_STEPS)).cast("b")
    if max(itertools.accumulate(steps)) > limit:
        return f"nested more than {limit} levels deep"
    return None


def decode(data: bytes | str, decoder: msgspec.json.Decoder | None = None, *, as_type: Any = Any) -> Any:
    """`data` decoded by `decoder` (or as `as_type`) once its nesting is checked; WireError otherwise."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    problem = nesting_error(raw)
    if problem is not None:
        raise WireError(problem)
    try:
        return decoder.decode(raw) if decoder is not None else msgspec.json.decode(raw, type=as_type)
    except (msgspec.DecodeError, UnicodeError, RecursionError, OverflowError) as exc:
        raise WireError(str(exc) or type(exc).__name__) from None
