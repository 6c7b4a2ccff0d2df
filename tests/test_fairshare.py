"""Fair share between projects (#3): among equal priority, projects take turns (start-time fair
queueing over the fold's per-project clocks), so a big submission never starves a small one; priority
still comes first. Folded and decided without a server, like the coordinator."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from decision_log import DecisionLog
from hypothesis import given, settings
from hypothesis import strategies as st

from dtf import events as ev
from dtf import schedule
from dtf.cli import submit as sub
from dtf.spec import Requirements, TaskSpec

T0 = datetime(2026, 1, 1, tzinfo=UTC)
POLICY = schedule.Policy(heartbeat_timeout=timedelta(days=30))
CPU = Requirements()
CUDA = Requirements(hardware=["cuda"])


def spec(priority: int = 5, requirements: Requirements = CPU) -> TaskSpec:
    return TaskSpec(type="command", config={"command": "true"}, priority=priority, requirements=requirements)


def submissions(project: str, count: int, at: datetime, priority: int = 5, start: int = 0) -> list[ev.TaskSubmitted]:
    return [ev.TaskSubmitted(id=f"s-{project}-{n}", time=at, run_id=project, task_id=f"{project}-{n}",
                             submitter="ci", project=project, spec=spec(priority))
            for n in range(start, start + count)]


def worker(worker_id: str, concurrency: int, hardware=("cpu",)) -> ev.WorkerRegistered:
    return ev.WorkerRegistered(id=f"reg-{worker_id}", time=T0, worker_id=worker_id, host="h", pid=1,
                               concurrency=concurrency, capabilities=ev.Capabilities(hardware=list(hardware)))


class Cluster:
    """Rounds as the coordinator runs them: decide, publish, and then every running task passes."""

    def __init__(self, *workers: ev.WorkerRegistered) -> None:
        self.log = DecisionLog(POLICY)
        self.log.add(*workers)
        self.order: list[str] = []
        """Task ids in the order they were assigned."""

    def round(self) -> list[ev.TaskAssigned]:
        assigned = [d for d in self.log.decide(T0) if isinstance(d, ev.TaskAssigned)]
        self.log.add(*assigned)
        self.order += [a.task_id for a in assigned]
        for a in assigned:
            self.log.add(ev.ResultReported(id=f"res-{a.task_id}", time=T0, run_id=a.run_id, task_id=a.task_id,
                                           attempt=a.attempt, worker_id=a.worker_id, outcome="passed"))
        return assigned

    def ready(self, project: str) -> int:
        return len(self.log.fold.queues.lanes.get(project, ()))


def project_of(task_id: str) -> str:
    return task_id.rsplit("-", 1)[0]


def test_a_small_project_arriving_behind_a_big_backlog_runs_at_once_taking_turns():
    cluster = Cluster(worker("w1", 2))
    cluster.log.add(*submissions("big", 1000, T0))
    for _ in range(50):
        cluster.round()
    cluster.log.add(*submissions("small", 5, T0 + timedelta(seconds=1)))
    seen = len(cluster.order)
    for _ in range(5):
        cluster.round()
    after = [project_of(t) for t in cluster.order[seen:]]
    assert after == ["small", "big"] * 5, "turns, starting with the newcomer"


def test_a_project_that_was_idle_banks_no_credit():
    cluster = Cluster(worker("w1", 1))
    cluster.log.add(*submissions("a", 2, T0))
    cluster.round(), cluster.round()  # a ran twice while b had nothing queued
    cluster.log.add(*submissions("a", 20, T0, start=2), *submissions("b", 20, T0))
    for _ in range(10):
        cluster.round()
    assert [project_of(t) for t in cluster.order[2:]] == ["b", "a"] * 5, \
        "b rejoins at the clock: one turn first, not a run of turns for the time it was idle"


def test_priority_comes_before_fair_share():
    cluster = Cluster(worker("w1", 1))
    cluster.log.add(*submissions("a", 5, T0, priority=1), *submissions("b", 5, T0, priority=5))
    for _ in range(10):
        cluster.round()
    assert [project_of(t) for t in cluster.order] == ["a"] * 5 + ["b"] * 5


def test_the_project_defaults_to_the_submitter():
    log = DecisionLog(POLICY)
    [default, named] = sub.submissions("r", [spec(), spec()], "alice", "")[0], sub.submissions("r2", [spec()], "alice", "ml")[0]
    log.add(default, named)
    assert (log.fold.tasks[default.task_id].project, log.fold.tasks[named.task_id].project) == ("alice", "ml")


def test_a_project_whose_tasks_no_free_worker_can_run_does_not_hold_up_the_others():
    cluster = Cluster(worker("w1", 1))
    cluster.log.add(ev.TaskSubmitted(id="s-gpu", time=T0, run_id="gpu", task_id="gpu-0", submitter="ci",
                                     project="gpu", spec=spec(requirements=CUDA)),
                    *submissions("cpu", 3, T0))
    for _ in range(3):
        cluster.round()
    assert cluster.order == ["cpu-0", "cpu-1", "cpu-2"]


@st.composite
def arrivals(draw) -> list[tuple[int, str, int]]:
    """(round, project, count): submissions arriving at the start of a round."""
    projects = ["p0", "p1", "p2", "p3"][:draw(st.integers(2, 4))]
    return [(draw(st.integers(0, 20)), draw(st.sampled_from(projects)), draw(st.integers(1, 30)))
            for _ in range(draw(st.integers(2, 6)))]


@settings(max_examples=40, deadline=None)
@given(arrivals(), st.integers(1, 4))
def test_while_two_projects_both_have_ready_work_their_assignments_differ_by_at_most_two(arrivals, concurrency):
    """Over any run of assignments during which both projects had ready tasks all along (all of one
    priority), neither got more than two more than the other: within one share either way."""
    cluster = Cluster(worker("w1", concurrency))
    submitted: dict[str, int] = {}
    steps: list[tuple[set[str], str]] = []
    """(projects with a ready task just before an assignment, the project assigned)"""
    last = max(when for when, _, _ in arrivals)
    for n in range(10_000):
        for when, project, count in arrivals:
            if when == n:
                cluster.log.add(*submissions(project, count, T0 + timedelta(seconds=n), start=submitted.get(project, 0)))
                submitted[project] = submitted.get(project, 0) + count
        left = {p: cluster.ready(p) for p in submitted}
        if n > last and not any(left.values()):
            break
        for assigned in cluster.round():
            steps.append(({p for p, k in left.items() if k}, project_of(assigned.task_id)))
            left[project_of(assigned.task_id)] -= 1
    assert len(steps) == sum(submitted.values()), "everything ran"
    for p in submitted:
        for q in submitted:
            for start in range(len(steps)):
                gap = 0
                for backlogged, project in steps[start:]:
                    if not {p, q} <= backlogged:
                        break
                    gap += (project == p) - (project == q)
                    assert abs(gap) <= 2, f"{p} and {q} drifted apart by {gap} from assignment {start}"


@st.composite
def mixed_queues(draw) -> DecisionLog:
    log = DecisionLog(POLICY)
    for n in range(draw(st.integers(1, 4))):
        log.add(worker(f"w{n}", draw(st.integers(1, 3)), hardware=draw(st.sampled_from([("cpu",), ("cpu", "cuda")]))))
    for n in range(draw(st.integers(1, 25))):
        project = draw(st.sampled_from(["a", "b", "c"]))
        log.add(ev.TaskSubmitted(
            id=f"s{n}", time=T0 + timedelta(seconds=draw(st.integers(0, 3))), run_id="r", task_id=f"t{n}",
            submitter="ci", project=project,
            spec=spec(draw(st.integers(0, 2)), draw(st.sampled_from([CPU, CPU, CUDA])))))
    return log


@settings(max_examples=100, deadline=None)
@given(mixed_queues())
def test_across_projects_a_more_urgent_ready_task_is_never_passed_over_for_a_worker_that_could_run_it(log):
    fold = log.fold
    assigned = {d.task_id: d.worker_id for d in log.decide(T0) if isinstance(d, ev.TaskAssigned)}
    for task in fold.tasks.values():
        if task.task_id in assigned:
            continue
        for other, worker_id in assigned.items():
            if fold.tasks[other].spec.priority > task.spec.priority:
                assert not schedule.capable(fold.workers[worker_id], task.spec.requirements), \
                    f"{task.task_id} (project {task.project}) waits while less urgent {other} runs on {worker_id}"
