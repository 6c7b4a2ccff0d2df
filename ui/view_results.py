"""Run results: every run's pass/fail, one run's tasks, and a task's tests and output (drill-down)."""

from __future__ import annotations

import logging

import panel as pn

from dtf.ui import html, model
from dtf.ui.session import Session

log = logging.getLogger("dtf.dashboard")


class ResultsView:
    def __init__(self, session: Session) -> None:
        self.session = session
        sheet = [session.stylesheet]
        self.runs = pn.pane.HTML("", stylesheets=sheet, sizing_mode="stretch_width",
                                 styles={"max-height": "260px", "overflow": "auto"})
        self.run = pn.widgets.Select(name="run", options=[], width=280)
        self.task = pn.widgets.Select(name="task (drill-down)", options=[], width=280)
        self.tasks = pn.pane.HTML("", stylesheets=sheet, sizing_mode="stretch_width")
        self.tests = pn.pane.HTML("", stylesheets=sheet, sizing_mode="stretch_width")
        self.output = pn.pane.HTML("", stylesheets=sheet, sizing_mode="stretch_width")
        self.task.param.watch(self._drill_down, "value")
        self.panel = pn.Card(
            self.runs, pn.Row(self.run, self.task), self.tasks, self.tests, self.output,
            title="Run results", collapsible=False, sizing_mode="stretch_width",
        )
        self._shown = (None, -1)
        self._following: dict[str, object] = {"run": None, "task": None}
        """The value each picker was last moved to by the view: while it still shows that, the
        picker follows the newest run (or its first task); once someone picks, it stays put."""

    def _follow(self, name: str, picker: pn.widgets.Select, choices: list[str]) -> None:
        if choices != picker.options:
            picker.options = choices
        if choices and (picker.value not in choices or self._following[name] in (None, picker.value)):
            if picker.value != choices[0]:
                picker.value = choices[0]
            self._following[name] = choices[0]

    def refresh(self) -> None:
        s = self.session
        rows = s.shared("runs", lambda: model.run_rows(s.feed.board))
        self.runs.object = s.shared("runs-html", lambda: html.table(rows, "runs", key="run", empty="no runs yet"))
        self._follow("run", self.run, [row["run"] for row in rows])
        if self.run.value is None:
            return
        run_id = self.run.value
        task_rows = model.task_rows(s.feed.board, run_id)
        self.tasks.object = html.table(task_rows, "run-tasks", key="task")
        self._follow("task", self.task, [row["task"] for row in task_rows])
        detail = s.feed.board.results.get(self.task.value) if self.task.value else None
        if detail is not None and self._shown != (self.task.value, detail.attempt):
            self._shown = (self.task.value, detail.attempt)
            pn.state.execute(self._load_detail)

    def _drill_down(self, _event=None) -> None:
        """Another task picked: the next refresh loads its tests and output."""
        self._shown = (None, -1)
        self.tests.object = self.output.object = ""

    async def _load_detail(self) -> None:
        feed, task_id = self.session.feed, self.task.value
        if not task_id:
            return
        rows = model.test_rows(feed.board.results.get(task_id))
        if not rows:
            try:
                rows = [{"test": r["nodeid"], "outcome": r["outcome"], "duration": model.duration(r["duration_s"]),
                         "message": (r.get("message") or "")[:200]} for r in await feed.tests_of(task_id)]
            except LookupError as exc:
                log.info("tests of %s: %s", task_id, exc)
        self.tests.object = html.table(rows, "tests", key="test", empty=f"{task_id}: no per-test results")
        self.output.object = html.pre(await feed.output_of(task_id) or "(no output)", "output")
