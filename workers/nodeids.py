"""pytest node ids as JUnit names, the way pytest's own junitxml makes them (`mangle_test_address`).

Standard library only: the worker's pytest plugin imports it inside the tests' Python, and the
JUnit report imports it in the projector's.
"""

from __future__ import annotations

import re


def junit_names(nodeid: str, prefix: str = "") -> tuple[str, str]:
    """(classname, name) of a node id: `tests/test_x.py::TestA::test_b[a::b]` ->
    (`tests.test_x.TestA`, `test_b[a::b]`). The parameters are cut off before the id is split, so
    `::` or `/` inside them change nothing; a bare path has the classname "" and its dotted form as name.
    `prefix` is a directory put before the path (see the plugin's DTF_SOURCE_PREFIX)."""
    path, sep, tail = nodeid.partition("::")
    if prefix:
        path = f"{prefix}/{path}"
    module = re.sub(r"\.py$", "", path.replace("/", "."))
    if not sep:
        return "", module
    names, bracket, params = tail.partition("[")
    parts = names.split("::")
    return ".".join([module, *parts[:-1]]), parts[-1] + bracket + params


def classname(nodeid: str, prefix: str = "") -> str:
    return junit_names(nodeid, prefix)[0]
