"""Every size and depth limit of the wire contract, in one place (streams/README.md lists them).

NATS refuses a message whose headers and payload together exceed the server's `max_payload` (1 MiB
by default, and in nats-server.conf) by closing the publisher's connection, and nats-py checks only
the payload, so a coordinator that re-publishes user data (a TaskAssigned embeds the whole spec) must
never be handed more than fits. Submissions are therefore capped well below it: a TaskSubmitted, and
its spec as re-encoded, may be at most MAX_SUBMISSION_BYTES; everything else a decision copies from
user input (a rejected payload, a reason) is clipped. JSON nesting is capped at MAX_DEPTH because
msgspec and Python's json give up with a RecursionError at a depth that depends on the caller's
stack, so the same message could decode in one process and fail in another: the bound must not.
"""

from __future__ import annotations

NATS_MAX_PAYLOAD = 1024 * 1024
"""nats-server's default `max_payload` (headers + payload), which nats-server.conf keeps."""
MAX_MSG_SIZE = NATS_MAX_PAYLOAD
"""DTF_EVENTS' `max_msg_size` (streams/topology.py)."""
MAX_SUBMISSION_BYTES = 256 * 1024
"""A TaskSubmitted as stored, and its spec as re-encoded (what TaskAssigned carries), at most this."""
MAX_DEPTH = 64
"""JSON nesting (arrays and objects) any decoder accepts; dtf's own events nest at most 6 deep."""
RAW_KEEP = 64 * 1024
"""How much of a rejected payload (bytes) a TaskRejected keeps for audit."""
REASON_KEEP = 2000
"""How much of a reason (characters) a decision keeps: reasons may quote user input."""


def clip(text: str, keep: int = REASON_KEEP) -> str:
    """`text`, cut to `keep` characters with a note of how much was cut."""
    if len(text) <= keep:
        return text
    return f"{text[:keep]}... ({len(text) - keep} more characters)"
MAX_ENV_REQUIREMENTS_BYTES = 64 * 1024
"""The requirement lines an EnvSpec inlines (dtf/pyenv.py), at most this: the spec rides in every
TaskSubmitted and TaskAssigned, so a huge lockfile must be refused at submit, not by NATS."""
