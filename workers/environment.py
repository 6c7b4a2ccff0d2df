"""The environment a task's process gets: the worker's own, minus credentials, plus the task's config.

Removed: DTF_CREDS, DTF_CONTEXT, every NATS_* variable, anything whose name contains CREDS, TOKEN,
SECRET or PASSWORD (case-insensitively) and any *URL* with a user:password@ in it, so a test cannot read the worker's bus credentials; also any DTF_TEST_REPORT,
DTF_METRICS and DTF_CONFIG* inherited from outside, since the runner sets those per attempt.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any

SECRET_WORDS = ("TOKEN", "SECRET", "PASSWORD")
PER_ATTEMPT = ("DTF_TEST_REPORT", "DTF_METRICS")


def is_sensitive(name: str, value: str = "") -> bool:
    upper = name.upper()
    return (upper.startswith("NATS_") or any(w in upper for w in SECRET_WORDS) or "CREDS" in upper
            or upper == "DTF_CONTEXT" or ("URL" in upper and "@" in value))


def scrubbed(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """A copy of `base` (default: this process's environment) without sensitive or per-attempt names."""
    source = os.environ if base is None else base
    return {
        name: value for name, value in source.items()
        if not is_sensitive(name, value) and name not in PER_ATTEMPT and not name.startswith("DTF_CONFIG")
    }


def env_value(value: Any) -> str:
    """How one config value reads in an environment variable (lists comma-joined, like the labels)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) and not isinstance(v, bool)
                                       for v in value):
        return ",".join(map(str, value))
    return json.dumps(value, sort_keys=True)


def config_vars(config: Mapping[str, Any]) -> dict[str, str]:
    """DTF_CONFIG=<json of the whole config> and DTF_CONFIG_<KEY>=<value> for each key but `command`
    (the key upper-cased, anything but letters, digits and _ turned into _)."""
    variables = {"DTF_CONFIG": json.dumps(dict(config), sort_keys=True, default=str)}
    for key, value in config.items():
        if key == "command":
            continue
        variables["DTF_CONFIG_" + re.sub(r"[^A-Z0-9_]", "_", str(key).upper())] = env_value(value)
    return variables
