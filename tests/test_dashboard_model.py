"""The dashboard's pure parts: the board folded from stream messages, its replay to a point in time,
and the rows each view shows. Generated histories (tests/test_fold.py) drive the properties: the
board agrees with the domain's fold, redeliveries change nothing, a replay to sequence N is the board
of the first N messages, and no attempt is open twice on the timeline."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st
from test_fold import HISTORIES, histories

from dtf import events as ev
from dtf import subjects
from dtf.spec import TaskSpec
from dtf.state import Fold
from dtf.ui import html, model
from dtf.ui.board import Board, Stored
from dtf.ui.replay import board_at, task_history

T0 = datetime(2026, 1, 5, 9, 0, tzinfo=UTC)
CMD = TaskSpec(type="command", config={"command": "make check"})


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def log_of(*events: ev.Event) -> list[Stored]:
    return [Stored(seq, subjects.subject_for(e), ev.encode(e)) for seq, e in enumerate(events, start=1)]


def folded(messages: list[Stored]) -> Board:
    board = Board()
    for m in messages:
        board.apply(m.subject, m.seq, m.data)
    return board


def registered(worker: str, t: float = 0, **fields) -> ev.WorkerRegistered:
    return ev.WorkerRegistered(id=f"reg-{worker}", time=at(t), worker_id=worker, host="box", pid=1, **fields)


def submitted(task: str, t: float = 1, run: str = "r1", spec: TaskSpec = CMD) -> ev.TaskSubmitted:
    return ev.TaskSubmitted(id=f"sub-{task}", time=at(t), run_id=run, task_id=task, submitter="ann", spec=spec)


def attempt(cls, task: str, t: float, worker: str = "w1", n: int = 1, run: str = "r1", **fields):
    return cls(id=f"{cls.__name__}-{task}-{n}", time=at(t), run_id=run, task_id=task, attempt=n, worker_id=worker,
               **fields)


def assigned(task: str, t: float, worker: str = "w1", n: int = 1, run: str = "r1") -> ev.TaskAssigned:
    return attempt(ev.TaskAssigned, task, t, worker, n, run, coordinator="c", spec=CMD)


A_DAY = log_of(
    registered("w1", concurrency=2,
               capabilities=ev.Capabilities(hardware=["cpu", "cuda"], cores=8, memory_gb=32, tags={"rack": "b"})),
    registered("w2"),
    submitted("build", 1),
    assigned("build", 2),
    attempt(ev.TaskStarted, "build", 3),
    attempt(ev.ResultReported, "build", 13, outcome="passed", duration_s=10.0,
            counts=ev.TestCounts(passed=2, failed=1),
            tests=[ev.TestOutcome(nodeid="t.py::ok", outcome="passed"),
                   ev.TestOutcome(nodeid="t.py::bad", outcome="failed", message="assert 1 == 2")],
            metrics={"seconds": 1.5}, labels={"model": "bert"}, output_tail="all good\n"),
    submitted("slow", 14),
    submitted("urgent", 15, spec=TaskSpec(type="command", config={"command": "x"}, priority=1)),
    assigned("slow", 16, worker="w2"),
    ev.WorkerLost(id="lost-w2", time=at(40), worker_id="w2", reason="no heartbeat for 15s"),
    attempt(ev.TaskFailed, "slow", 41, worker="w2", category="worker", reason="worker lost"),
    ev.WorkerQuarantined(id="q-w1", time=at(42), worker_id="w1", until=at(72), reason="3 infrastructure failures"),
)


def test_the_workers_view_shows_capabilities_state_current_task_heartbeat_age_and_quarantine():
    board = folded(A_DAY)
    rows = {r["worker"]: r for r in model.worker_rows(board, now=at(50))}
    assert rows["w1"]["capabilities"] == "cpu/cuda, 8 cores, 32 GB, rack=b"
    assert rows["w1"]["state"] == "quarantined" and rows["w1"]["quarantine"].startswith("until 09:01:12 (#1)")
    assert rows["w1"]["heartbeat"] == "50s"  # registered at T0, no heartbeat since
    assert rows["w2"]["state"] == "lost" and rows["w2"]["current task"] == "-"


def test_the_queue_lists_waiting_tasks_in_the_schedulers_order():
    rows = model.queue_rows(folded(A_DAY), now=at(50))
    assert [(r["#"], r["task"]) for r in rows] == [(1, "urgent"), (2, "slow")]
    assert rows[1]["why"].startswith("worker: ")  # requeued after its worker was lost


def test_the_timeline_has_one_bar_per_attempt_coloured_by_how_it_ended():
    bars = model.timeline(folded(A_DAY), now=at(50))
    assert [(b.task, b.worker, b.status, b.open) for b in bars] == [
        ("build", "w1", "passed", False), ("slow", "w2", "lost", False)]
    assert bars[0].start == at(3) and bars[0].end == at(13)  # from its start, not its assignment


def test_results_drill_down_from_runs_to_tasks_to_tests_failures_first():
    board = folded(A_DAY)
    [run] = model.run_rows(board)
    assert (run["run"], run["tasks"], run["done"], run["state"]) == ("r1", 3, 1, "running")
    assert [r["task"] for r in model.task_rows(board, "r1")] == ["build", "slow", "urgent"]
    tests = model.test_rows(board.results["build"])
    assert [(t["test"], t["outcome"]) for t in tests] == [("t.py::bad", "failed"), ("t.py::ok", "passed")]
    assert board.results["build"].output_tail == "all good\n"


def test_benchmark_metrics_become_series_named_by_metric_and_labels():
    board = folded(A_DAY)
    trend = model.trend(board, "seconds{model=bert}")
    assert list(board.series) == ["seconds{model=bert}"]
    assert trend.values == [1.5] and trend.tasks == ["build"] and trend.flagged == []


def test_alerts_name_lost_and_quarantined_workers_newest_first():
    rows = model.alert_rows(folded(A_DAY), now=at(50))
    assert [(r["kind"], r["about"], r["severity"]) for r in rows] == [
        ("quarantined", "w1", "warning"), ("lost", "w2", "error")]


def bench_result(task: str, t: float, value: float, run: str) -> list[ev.Event]:
    return [submitted(task, t, run=run), assigned(task, t, run=run),
            attempt(ev.ResultReported, task, t + 1, run=run, outcome="passed", metrics={"seconds": value})]


def test_a_regression_from_the_detector_is_an_alert_and_marks_the_results_since_the_change():
    history = [registered("w1")]
    for i, value in enumerate([1.0, 1.0, 1.0, 2.0, 2.0]):
        history += bench_result(f"b{i}", 10 * i, value, run=f"r{i}")
    board = folded(log_of(*history))
    after = [p.result_id for p in board.series["seconds"]][3:]
    regression = ev.RegressionDetected(
        id="regression-x", time=at(60), run_id="r4", task_id="b4", series="bench:seconds@cpu", benchmark="bench",
        metric="seconds", better="lower", size=1.0, confidence=0.99, detector="page-hinkley", result_ids=after,
        before=1.0, after=2.0, change_run_id="r3")
    board.apply(subjects.subject_for(regression), board.last_seq + 1, ev.encode(regression))
    assert model.trend(board, "seconds").flagged == [3, 4]
    [alert] = model.alert_rows(board, now=at(61))
    assert alert["kind"] == "regression" and "from 1 to 2 (+100%)" in alert["what"]


def test_replay_to_a_time_shows_the_state_as_it_was_then():
    then = board_at(A_DAY, {}, until=at(30))
    assert then.fold.tasks["build"].status == "passed"
    assert then.fold.tasks["slow"].status == "assigned" and then.fold.workers["w2"].status == "online"
    assert folded(A_DAY).fold.tasks["slow"].status == "pending"


def test_a_heartbeat_later_than_the_cut_is_left_out_of_a_replay():
    beat = ev.WorkerHeartbeat(id="hb", time=at(35), worker_id="w1")
    heartbeats = {subjects.subject_for(beat): ev.encode(beat)}
    assert board_at(A_DAY, heartbeats, until=at(30)).fold.workers["w1"].last_heartbeat is None
    assert board_at(A_DAY, heartbeats, until=at(36)).fold.workers["w1"].last_heartbeat == at(35)


def test_a_tasks_history_lists_its_events_in_stream_order():
    lines = task_history(A_DAY, "build")
    assert [(x.seq, x.type) for x in lines] == [
        (3, "TaskSubmitted"), (4, "TaskAssigned"), (5, "TaskStarted"), (6, "ResultReported")]
    assert "outcome=passed" in lines[-1].detail


def stored(history: list[tuple[str, bytes]]) -> list[Stored]:
    return [Stored(seq, subject, data) for seq, (subject, data) in enumerate(history, start=1)]


def states(board: Board) -> tuple:
    return (msgspec.to_builtins(board.fold.tasks), msgspec.to_builtins(board.fold.workers),
            [(s.task_id, s.attempt, s.status, s.end) for s in board.segments], list(board.alerts))


@HISTORIES
@given(histories())
def test_the_board_agrees_with_the_domains_fold_on_every_task_and_worker(history):
    fold = Fold()
    for seq, (subject, data) in enumerate(history, start=1):
        fold.apply(subject, seq, data)
    board = folded(stored(history))
    assert board.fold.tasks == fold.tasks and board.fold.workers == fold.workers


@HISTORIES
@given(histories(), st.data())
def test_a_follow_restarted_from_an_earlier_sequence_changes_nothing(history, data):
    messages = stored(history)
    board = folded(messages)
    again = messages[: data.draw(st.integers(0, len(messages)))]
    for m in again:  # redelivered after the follow restarted
        board.apply(m.subject, m.seq, m.data)
    assert states(board) == states(folded(messages))


@HISTORIES
@given(histories(), st.data())
def test_a_replay_to_sequence_n_is_the_board_of_the_first_n_messages(history, data):
    messages = stored(history)
    n = data.draw(st.integers(0, len(messages)))
    assert states(board_at(messages, {}, upto_seq=n or None)) == states(folded(messages if n == 0 else messages[:n]))


@HISTORIES
@given(histories())
def test_no_attempt_is_ever_open_twice_and_every_closed_bar_has_an_end(history):
    board = folded(stored(history))
    keys = [(s.task_id, s.attempt) for s in board.segments]
    assert len(keys) == len(set(keys))
    assert all((s.end is None) == (s.status in ("assigned", "running")) for s in board.segments)


@settings(max_examples=200)
@given(st.lists(st.dictionaries(st.sampled_from(["task", "state", "what"]), st.text(), min_size=3, max_size=3),
                min_size=1, max_size=3))
def test_tables_escape_whatever_text_the_log_carries(rows):
    rows = [{k: row[k] for k in ("task", "state", "what")} for row in rows]
    out = html.table(rows, "x", key="task")
    assert "<script" not in out.replace("&lt;script", "")
    assert out.count("<tr") == len(rows) + 1


@given(st.integers(0, 10**7))
def test_ages_read_in_the_largest_whole_unit(seconds):
    text = model.age(T0, T0 + timedelta(seconds=seconds))
    number, unit = int(text[:-1]), text[-1]
    size = {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]
    assert number * size <= seconds < (number + 1) * size
    assert unit == "d" or number < {"s": 60, "m": 60, "h": 24}[unit]


def test_flaky_tests_from_the_read_model_join_the_alerts_by_their_last_flip():
    flaky = [{"test": "t.py::racy", "commit": "0123456789abcdef", "hardware": "cpu", "runs": 5, "passed": 3,
              "failed": 2, "flips": 3, "flip_rate": 0.75, "first_seen": at(1).isoformat(),
              "last_seen": at(45).isoformat()}]
    rows = model.alert_rows(folded(A_DAY), now=at(50), flaky=flaky)
    assert [(r["kind"], r["about"]) for r in rows] == [("flaky", "t.py::racy"), ("quarantined", "w1"), ("lost", "w2")]
    assert rows[0]["what"] == "passed 3, failed 2 of 5 runs on commit 0123456789 (cpu): 3 flips"


def test_with_the_detectors_naming_a_trend_is_the_series_the_detector_watches():
    from dtf.cli.commands_dashboard import detector_series
    from dtf.projections.detection import points
    from dtf.projections.detector import Results
    from dtf.streams.bus import StoredMsg

    spec = TaskSpec(type="benchmark", name="sort", config={"command": "python bench.py"})
    history = log_of(registered("w1"), submitted("b1", 1, spec=spec), assigned("b1", 2),
                     attempt(ev.ResultReported, "b1", 3, outcome="passed", metrics={"seconds": 1.5, "rate": 9.0},
                             labels={"batch": "8"}))
    board = Board(detector_series)
    watched = set()
    results = Results()
    for m in history:
        board.apply(m.subject, m.seq, m.data)
        _, counted = results.apply(StoredMsg("DTF_EVENTS", m.seq, m.subject, m.data), {})
        if counted is not None:
            watched |= {key.name for key, failures, _ in points(*counted) if not failures}
    assert set(board.series) == watched == {"sort:seconds{batch=8}@cpu", "sort:rate{batch=8}@cpu"}


def test_a_forecast_is_a_band_at_the_last_run_and_the_next_ones_at_the_usual_spacing():
    times = [at(0), at(60), at(120), at(300)]
    answer = {"model": "AutoETS", "level": 95, "runs": 4,
              "last": {"value": 5.0, "expected": 4.0, "lo": 3.5, "hi": 4.5, "outside": True},
              "forecast": [{"step": 1, "mean": 4.0, "lo": 3.0, "hi": 5.0}, {"step": 2, "mean": 4.0, "lo": 2.5, "hi": 5.5}]}
    band = model.forecast_band(times, answer)
    assert band["time"] == [at(300), at(360), at(420)]  # the median gap between runs is 60 s
    assert band["lo"] == [3.5, 3.0, 2.5] and band["hi"] == [4.5, 5.0, 5.5] and band["mean"] == [4.0, 4.0, 4.0]
    assert "is OUTSIDE [3.5, 4.5]" in model.forecast_note(answer)
    assert model.forecast_note("no forecast: 4 runs") == "no forecast: 4 runs"
