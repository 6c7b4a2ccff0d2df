"""The dashboard in a real browser: `dtf up` (nats-server, coordinator, projector, two workers and the
dashboard as separate processes), headless Debian Chromium driven by Playwright, work submitted with
`dtf submit` while the page is open. Workers and results must appear without a reload, in the light
and the dark theme; more tabs must not add consumers on the event stream. Screenshots go to
tests/artifacts/ (dashboard-light.png, dashboard-dark.png, dashboard-replay.png)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from dtf.streams import auth, bus, topology

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"
EXAMPLES = ROOT / "examples"
WAIT_MS = 60_000
"""How long a step may take to show up (a ceiling on a slow CI machine, not a speed check)."""
BROWSER_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).exists():
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)

from playwright.sync_api import Page, expect, sync_playwright  # noqa: E402


class System:
    """`dtf up` with its dashboard on a temporary data dir; commands find it through its context."""

    def __init__(self, tmp: Path) -> None:
        self.data_dir = tmp / "d"
        self.env = {**os.environ, "XDG_STATE_HOME": str(tmp / "state")}
        for name in ("DTF_NATS_URL", "DTF_CREDS", "DTF_CA"):
            self.env.pop(name, None)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "dtf", "up", "--workers", "2", "--data-dir", str(self.data_dir),
             "--nats-port", "0", "--dashboard-port", "0"],
            stdout=subprocess.PIPE, stderr=open(tmp / "up.log", "ab"), env=self.env, text=True,
        )
        line = self.process.stdout.readline()
        assert line.startswith("export DTF_NATS_URL="), f"dtf up printed {line!r}"
        self.context = json.loads((self.data_dir / "context.json").read_text())
        self.url = self.context["dashboard_url"]
        self._wait_for_dashboard()

    def _wait_for_dashboard(self) -> None:
        """The dashboard is a child process of its own: it listens a moment after `dtf up` says ready."""
        parsed = urlsplit(self.url)
        deadline = time.monotonic() + WAIT_MS / 1000
        while True:
            try:
                socket.create_connection((parsed.hostname, parsed.port), timeout=1).close()
                return
            except OSError:
                assert time.monotonic() < deadline, f"nothing listens at {self.url}"
                time.sleep(0.2)

    def dtf(self, *args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dtf", *args], capture_output=True, text=True, env=self.env,
                              timeout=300, cwd=ROOT)

    def submit(self, *args: str) -> dict:
        done = self.dtf("submit", *args, "--wait", "--json")
        assert done.stdout.strip(), done.stderr
        return json.loads(done.stdout)

    def event_consumers(self) -> int:
        async def count() -> int:
            options = auth.client_options(self.context.get("creds"), self.context.get("ca"))
            nc = await bus.connect(self.context["nats_url"], name="test", **options)
            try:
                return (await nc.jetstream().stream_info(topology.EVENTS)).state.consumer_count
            finally:
                await nc.close()

        with ThreadPoolExecutor(1) as thread:  # Playwright's sync API owns this thread's event loop
            return thread.submit(asyncio.run, count()).result()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=90)


@pytest.fixture
def system(tmp_path):
    running = System(tmp_path)
    yield running
    if running.process.poll() is None:
        assert running.stop() == 0


@pytest.fixture
def browser(tmp_path):
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=CHROMIUM, args=BROWSER_ARGS,
            viewport={"width": 1400, "height": 2300},
        )
        yield chromium
        chromium.close()


def rows(page: Page, view: str):
    return page.locator(f'table[data-view="{view}"] tbody tr')


def mark_page(page: Page) -> None:
    """A flag that a reload would wipe: proof that what follows arrived live."""
    page.evaluate("window.dtfNoReload = true")


def assert_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.dtfNoReload === true")


def shoot(page: Page, name: str) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / name), full_page=True)


def test_workers_and_new_results_appear_live_in_both_themes(system, browser):
    page = browser.new_page()
    page.goto(system.url)
    expect(rows(page, "workers")).to_have_count(2, timeout=WAIT_MS)
    expect(page.locator('table[data-view="workers"] .badge.s-online')).to_have_count(2, timeout=WAIT_MS)
    mark_page(page)

    report = system.submit(str(EXAMPLES / "mixed"))
    run_id, [task] = report["run_id"], report["tasks"]
    run_row = page.locator(f'table[data-view="runs"] tr[data-key="{run_id}"]')
    expect(run_row).to_contain_text("failed", timeout=WAIT_MS)
    expect(run_row).to_contain_text("3 passed, 1 failed, 1 skipped")
    # The newest run is picked for drill-down: its task, its tests (failures first) and its output.
    expect(page.locator(f'table[data-view="run-tasks"] tr[data-key="{task["task_id"]}"]')).to_be_visible()
    expect(rows(page, "tests").first).to_contain_text("failed", timeout=WAIT_MS)
    expect(page.locator('pre[data-view="output"]')).to_contain_text("1 failed", timeout=WAIT_MS)
    expect(page.locator('[data-tile="passed"]')).to_have_text("0")
    expect(page.locator('[data-tile="failed"]')).to_have_text("1")
    assert_not_reloaded(page)
    shoot(page, "dashboard-light.png")

    page.get_by_role("button", name="dark theme").click()
    page.wait_for_url("**theme=dark**")
    expect(page.locator('table[data-view="workers"] .badge.s-online')).to_have_count(2, timeout=WAIT_MS)
    mark_page(page)
    bench = system.submit("--benchmark", "python bench_example.py", "--config", "batch_size=2", str(EXAMPLES))
    expect(page.locator(f'table[data-view="runs"] tr[data-key="{bench["run_id"]}"]')).to_contain_text(
        "passed", timeout=WAIT_MS)
    expect(page.locator('[data-tile="passed"]')).to_have_text("1")
    # Series are named as the detector names them; one run is too few for a forecast, and it says so.
    expect(page.get_by_label("series")).to_have_value(
        re.compile(r"^python bench_example.py:items_per_second\{batch_size=2\}@"), timeout=WAIT_MS)
    expect(page.locator('[data-view="forecast"]')).to_contain_text("no forecast", timeout=WAIT_MS)
    # Drill-down follows the newest run while nobody picked another: the benchmark's own output.
    expect(page.locator('pre[data-view="output"]')).to_contain_text("items_per_second", timeout=WAIT_MS)
    assert_not_reloaded(page)
    assert page.evaluate("getComputedStyle(document.body).backgroundColor") != "rgb(255, 255, 255)"
    shoot(page, "dashboard-dark.png")

    page.get_by_label("task id (its history)").fill(task["task_id"])
    page.get_by_role("button", name="Replay").click()
    history = rows(page, "replay-history")
    expect(history.first).to_contain_text("TaskSubmitted", timeout=WAIT_MS)
    expect(history.last).to_contain_text("ResultReported")
    page.locator('table[data-view="replay-history"]').scroll_into_view_if_needed()
    shoot(page, "dashboard-replay.png")


def test_more_tabs_share_the_one_feed_and_open_on_the_full_state(system, browser):
    first = browser.new_page()
    first.goto(system.url)
    expect(rows(first, "workers")).to_have_count(2, timeout=WAIT_MS)
    report = system.submit("--command", "echo hello from the dashboard test")
    consumers = system.event_consumers()

    tabs = [browser.new_page() for _ in range(3)]
    for tab in tabs:  # opened after the run: each shows it from the start
        tab.goto(system.url)
        expect(tab.locator(f'table[data-view="runs"] tr[data-key="{report["run_id"]}"]')).to_contain_text(
            "passed", timeout=WAIT_MS)
    assert system.event_consumers() == consumers
