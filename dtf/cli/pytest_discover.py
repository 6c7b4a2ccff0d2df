"""A pytest plugin for `dtf submit --split`: the files pytest would collect, without importing them.

    DTF_DISCOVER_OUT=files.txt python -m pytest --collect-only -q -p dtf.cli.pytest_discover ARGS

Every file collector (a test module, a doctest text file, a plugin's own file type) is reported
collected with nothing in it, and its path, relative to the rootdir, is written to the file named by
DTF_DISCOVER_OUT, one a line, in collection order. So pytest's own rules choose the files
(python_files, norecursedirs, --ignore, conftest collect_ignore, ...) and conftest files load as
usual, but no test module is imported: this costs pytest's start-up, not the suite's imports, and
`splitting` can then collect slices of the files in parallel.
"""

from __future__ import annotations

import os

import pytest

OUT_ENV = "DTF_DISCOVER_OUT"


class Discovery:
    def __init__(self, path: str) -> None:
        self.path = path
        self.files: list[str] = []

    @pytest.hookimpl(tryfirst=True)
    def pytest_make_collect_report(self, collector: pytest.Collector) -> pytest.CollectReport | None:
        if not isinstance(collector, pytest.File):
            return None
        self.files.append(os.path.relpath(collector.path, collector.config.rootpath))
        return pytest.CollectReport(collector.nodeid, "passed", None, [])

    def pytest_collection_finish(self, session: pytest.Session) -> None:
        with open(self.path, "w", encoding="utf-8") as out:
            out.writelines(f"{name}\n" for name in self.files)


def pytest_configure(config: pytest.Config) -> None:
    path = os.environ.get(OUT_ENV)
    if path:
        config.pluginmanager.register(Discovery(path), "dtf-discover")
