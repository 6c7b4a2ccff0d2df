"""The scheduler: pure decisions from a fold. Checked against generated clusters (workers with
capabilities, slots and liveness; tasks with requirements, priorities, dependencies and histories)
with oracles written independently of `dtf.schedule`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dtf import events as ev
from dtf import schedule, subjects
from dtf.spec import Requirements, RetryPolicy, TaskSpec
from dtf.state import AT_CAPACITY, FULL_BACKOFF, Fold, TaskState

CLUSTERS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

RUN = "r1"
T0 = datetime(2025, 6, 1, 10, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=5)
POLICY = schedule.Policy()
TIMEOUT = POLICY.heartbeat_timeout


# --- generated clusters --------------------------------------------------------------------------------

HARDWARE = ("cpu", "cuda", "rocm", "browser")
TAGS = st.dictionaries(st.sampled_from(["os", "pool"]), st.sampled_from(["linux", "mac", "gpu"]), max_size=2)

worker_caps = st.builds(
    ev.Capabilities,
    hardware=st.lists(st.sampled_from(HARDWARE), max_size=3, unique=True).map(lambda h: sorted({"cpu", *h})),
    memory_gb=st.sampled_from([0.0, 4.0, 8.0, 16.0, 64.0]),
    gpus=st.lists(st.builds(ev.Gpu, name=st.just("gpu"), memory_gb=st.just(16.0),
                            cuda_compute=st.sampled_from([None, 6.1, 7.5, 8.6])), max_size=2),
    tags=st.tuples(TAGS, st.sampled_from([{}, {"browser": "firefox"}, {"device_type": "mobile"}]))
    .map(lambda t: {**t[0], **t[1]}),
)
requirements = st.builds(  # mostly loose, now and then demanding
    Requirements,
    hardware=st.sampled_from([[], [], ["cpu"], ["cuda"], ["cuda", "rocm"], ["browser"]]),
    min_memory_gb=st.sampled_from([None, None, 0.0, 8.0, 32.0]),
    min_cuda_compute=st.sampled_from([None, None, None, 7.0, 8.0]),
    gpu_count=st.sampled_from([0, 0, 0, 1, 2]),
    browser=st.sampled_from([None, None, None, "firefox"]),
    device_type=st.sampled_from([None, None, None, "mobile"]),
    tags=st.one_of(st.just({}), st.just({}), TAGS),
)
LIVENESS = ("fresh", "fresh", "just-registered", "silent", "stale", "left")
HISTORY = ("pending", "pending", "pending", "passed", "failed", "active", "started", "released", "backoff",
           "cancelled")


class Cluster:
    """Events for a few workers and tasks, published in order into a fold, as the coordinator sees them."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.fold = Fold()

    def publish(self, event: ev.Event) -> None:
        subject, data = subjects.subject_for(event), ev.encode(event)
        self.messages.append((subject, data))
        applied = self.fold.apply(subject, len(self.messages), data)
        assert applied.event is not None, applied.invalid_reason

    def refold(self) -> Fold:
        fold = Fold()
        for seq, (subject, data) in enumerate(self.messages, 1):
            fold.apply(subject, seq, data)
        return fold


@st.composite
def clusters(draw) -> Cluster:
    cluster = Cluster()
    worker_ids = [f"w{i}" for i in range(draw(st.integers(1, 4)))]
    for wid in worker_ids:
        liveness = draw(st.sampled_from(LIVENESS))
        registered = NOW - timedelta(seconds=5) if liveness == "just-registered" else T0
        cluster.publish(ev.WorkerRegistered(id=f"reg-{wid}", time=registered, worker_id=wid, host="h", pid=1,
                                            concurrency=draw(st.sampled_from([0, 1, 2, 3, 3])),
                                            capabilities=draw(worker_caps)))
        if liveness == "fresh":
            cluster.publish(ev.WorkerHeartbeat(id=f"hb-{wid}", time=NOW - timedelta(seconds=5), worker_id=wid))
        elif liveness == "stale":
            cluster.publish(ev.WorkerHeartbeat(id=f"hb-{wid}", time=NOW - TIMEOUT - timedelta(seconds=1),
                                               worker_id=wid))
        elif liveness == "left":
            cluster.publish(ev.WorkerLeft(id=f"left-{wid}", time=T0, worker_id=wid))
    task_ids = [f"t{i}" for i in range(draw(st.integers(1, 8)))]
    for i, tid in enumerate(task_ids):
        deps = draw(st.lists(st.sampled_from(task_ids[:i] + ["t-unknown"]), max_size=2, unique=True)) if i else []
        spec = TaskSpec(
            type="command", config={"command": "x"}, requirements=draw(requirements),
            priority=draw(st.integers(0, 3)), dependencies=deps,
            retry_policy=RetryPolicy(max_retries=1, retry_delay_seconds=1000, jitter=False),
        )
        at = T0 + timedelta(seconds=draw(st.integers(0, 3)))  # equal times happen: ties go by task id
        cluster.publish(ev.TaskSubmitted(id=f"sub-{tid}", time=at, run_id=RUN, task_id=tid, submitter="alice",
                                         spec=spec))
        history = draw(st.sampled_from(HISTORY))
        if history == "pending":
            continue
        if history == "cancelled":
            cluster.publish(ev.TaskCancelled(id=f"cancel-{tid}", time=at, run_id=RUN, task_id=tid, by="alice"))
            continue
        a = {"time": at, "run_id": RUN, "task_id": tid, "attempt": 1, "worker_id": draw(st.sampled_from(worker_ids))}
        cluster.publish(ev.TaskAssigned(id=f"as-{tid}", **a, coordinator="c", spec=spec))
        if history in ("passed", "failed", "started"):
            cluster.publish(ev.TaskStarted(id=f"st-{tid}", **a))
        if history in ("passed", "failed"):
            cluster.publish(ev.ResultReported(id=f"res-{tid}", **a, outcome=history))
        elif history == "released":
            cluster.publish(ev.TaskReleased(id=f"rel-{tid}", **a, reason="draining"))
        elif history == "backoff":
            cluster.publish(ev.TaskFailed(id=f"fail-{tid}", **a, reason="lost"))
    for n in range(draw(st.integers(0, 2))):
        subject = subjects.task(RUN, f"g{n}", "submitted", "mallory")
        cluster.messages.append((subject, b"\x00garbage"))
        assert cluster.fold.apply(subject, len(cluster.messages), b"\x00garbage").invalid_reason
    return cluster


# --- oracles, written without looking at dtf.schedule's helpers --------------------------------------------


def meets(caps: ev.Capabilities, req: Requirements) -> bool:
    hardware_ok = not req.hardware or any(kind in caps.hardware for kind in req.hardware)
    memory_ok = req.min_memory_gb is None or caps.memory_gb >= req.min_memory_gb
    gpus_ok = len(caps.gpus) >= req.gpu_count
    cuda_ok = req.min_cuda_compute is None or any(
        g.cuda_compute is not None and g.cuda_compute >= req.min_cuda_compute for g in caps.gpus
    ) or (req.min_cuda_compute == 0 and bool(caps.gpus))
    wanted = {**req.tags, **({"browser": req.browser} if req.browser else {}),
              **({"device_type": req.device_type} if req.device_type else {})}
    tags_ok = all(caps.tags.get(k) == v for k, v in wanted.items())
    return hardware_ok and memory_ok and gpus_ok and cuda_ok and tags_ok


def heard_from(w) -> datetime | None:
    return w.last_heartbeat or w.registered_at


def live(fold: Fold) -> dict[str, int]:
    """Free slots of every worker that may get work now: online, heard from within the timeout."""
    free = {}
    for w in fold.workers.values():
        if w.status == "online" and NOW - heard_from(w) <= TIMEOUT:
            busy = sum(1 for t in fold.tasks.values() if t.worker_id == w.worker_id and t.status in ("assigned", "running"))
            free[w.worker_id] = w.concurrency - busy
    return free


def is_ready(task: TaskState, fold: Fold) -> bool:
    return (
        task.status == "pending" and task.spec is not None
        and (task.not_before is None or task.not_before <= NOW)
        and all(fold.tasks.get(d) is not None and fold.tasks[d].status == "passed" for d in task.spec.dependencies)
    )


def urgency(task: TaskState):
    return (task.spec.priority, task.submitted_at, task.task_id)


def decide(fold: Fold) -> list[ev.Event]:
    return list(schedule.decide(fold, NOW, "coord", POLICY))


# --- properties ------------------------------------------------------------------------------------------


@CLUSTERS
@given(clusters())
def test_assignments_respect_free_slots_capabilities_liveness_and_dependencies(cluster):
    fold = cluster.fold
    free = live(fold)
    assigned = [d for d in decide(fold) if isinstance(d, ev.TaskAssigned)]
    assert len({d.task_id for d in assigned}) == len(assigned), "a task is assigned once"
    for worker_id in {d.worker_id for d in assigned}:
        assert worker_id in free, "only online workers heard from within the timeout get work"
        assert sum(d.worker_id == worker_id for d in assigned) <= free[worker_id]
    for d in assigned:
        task = fold.tasks[d.task_id]
        assert is_ready(task, fold), "only pending tasks past their backoff whose dependencies passed"
        assert meets(fold.workers[d.worker_id].capabilities, task.spec.requirements)
        assert (d.run_id, d.attempt, d.spec, d.coordinator) == (task.run_id, task.attempt + 1, task.spec, "coord")
        assert d.id == f"assign-{task.task_id}-{task.attempt + 1}" and d.time == NOW


@CLUSTERS
@given(clusters())
def test_a_more_urgent_ready_task_is_never_passed_over_for_a_worker_that_could_run_it(cluster):
    fold = cluster.fold
    free = live(fold)
    assigned = {d.task_id: d.worker_id for d in decide(fold) if isinstance(d, ev.TaskAssigned)}
    left = dict(free)
    for worker_id in assigned.values():
        left[worker_id] -= 1
    for task in fold.tasks.values():
        if not is_ready(task, fold) or task.task_id in assigned:
            continue
        caps = lambda wid: fold.workers[wid].capabilities
        for other_id, worker_id in assigned.items():
            if urgency(fold.tasks[other_id]) > urgency(task):
                assert not meets(caps(worker_id), task.spec.requirements), (
                    f"{task.task_id} waits while less urgent {other_id} runs on {worker_id}"
                )
        assert not any(left[w] > 0 and meets(caps(w), task.spec.requirements) for w in left), \
            "a ready task waits only when no capable worker has a free slot"


@CLUSTERS
@given(clusters())
def test_deciding_twice_or_on_a_refolded_log_gives_the_same_decisions(cluster):
    first = [ev.encode(d) for d in decide(cluster.fold)]
    assert [ev.encode(d) for d in decide(cluster.fold)] == first
    assert [ev.encode(d) for d in decide(cluster.refold())] == first


@CLUSTERS
@given(clusters())
def test_a_task_whose_dependency_did_not_pass_is_cancelled_and_no_other(cluster):
    fold = cluster.fold
    cancelled = {d.task_id: d for d in decide(fold) if isinstance(d, ev.TaskCancelled)}
    for task in fold.tasks.values():
        doomed = task.status == "pending" and task.spec is not None and any(
            fold.tasks.get(dep) is not None and fold.tasks[dep].terminal and fold.tasks[dep].status != "passed"
            for dep in task.spec.dependencies
        )
        assert (task.task_id in cancelled) == doomed
        if doomed:
            d = cancelled[task.task_id]
            assert d.by == subjects.COORDINATOR and d.reason.startswith("dependency ")
            assert d.id == f"cancel-{task.task_id}-dep"


@CLUSTERS
@given(clusters())
def test_silent_workers_are_declared_lost_and_attempts_on_gone_workers_are_failed_for_requeue(cluster):
    fold = cluster.fold
    decisions = decide(fold)
    lost = {d.worker_id for d in decisions if isinstance(d, ev.WorkerLost)}
    assert lost == {w.worker_id for w in fold.workers.values()
                    if w.status == "online" and NOW - heard_from(w) > TIMEOUT}
    failed = {(d.task_id, d.attempt, d.worker_id) for d in decisions
              if isinstance(d, ev.TaskFailed) and d.id.startswith("lost-")}
    assert failed == {
        (t.task_id, t.attempt, t.worker_id) for t in fold.tasks.values()
        if t.status in ("assigned", "running") and fold.workers[t.worker_id].status in ("lost", "left")
    }
    assert all(d.category == "worker" for d in decisions if isinstance(d, ev.TaskFailed))


UNSTARTED = "not started by the start deadline"
ORDER = [ev.WorkerLost, ev.TaskFailed, ev.TaskRejected, UNSTARTED, ev.TaskCancelled, ev.TaskUnschedulable,
         ev.TaskDeadlineMissed, ev.TaskAssigned, ev.TaskPreempted]


def kind(decision: ev.Event) -> object:
    """A decision's place in ORDER: a not-started failure is a TaskFailed of its own kind."""
    return UNSTARTED if isinstance(decision, ev.TaskFailed) and decision.id.startswith("unstarted-") else type(decision)


@CLUSTERS
@given(clusters())
def test_published_decisions_are_all_accepted_and_not_repeated(cluster):
    decisions = decide(cluster.fold)
    kinds = [kind(d) for d in decisions]
    assert kinds == sorted(kinds, key=ORDER.index), "verdicts before new work"
    assert {d.source_seq for d in decisions if isinstance(d, ev.TaskRejected)} == set(cluster.fold.invalid)
    for decision in decisions:
        cluster.publish(decision)
    again = decide(cluster.fold)
    assert not {d.id for d in again} & {d.id for d in decisions}
    assert not {d.task_id for d in again if isinstance(d, ev.TaskAssigned)} & \
        {d.task_id for d in decisions if isinstance(d, ev.TaskAssigned)}
    assert not [d for d in again if isinstance(d, ev.TaskRejected)]


# --- targeted cases -------------------------------------------------------------------------------------


def simple_cluster(*tasks: tuple[str, int, list[str]], concurrency=1) -> Cluster:
    cluster = Cluster()
    cluster.publish(ev.WorkerRegistered(id="reg-w1", time=NOW - timedelta(seconds=1), worker_id="w1", host="h",
                                        pid=1, concurrency=concurrency))
    for tid, priority, deps in tasks:
        cluster.publish(ev.TaskSubmitted(
            id=f"sub-{tid}", time=T0, run_id=RUN, task_id=tid, submitter="alice",
            spec=TaskSpec(type="command", config={"command": "x"}, priority=priority, dependencies=deps),
        ))
    return cluster


def test_the_lowest_priority_number_goes_first_then_submission_order():
    cluster = simple_cluster(("a", 3, []), ("b", 1, []), ("c", 2, []), ("d", 1, []), concurrency=2)
    assert [(d.task_id, d.worker_id) for d in decide(cluster.fold)] == [("b", "w1"), ("d", "w1")]


def test_a_failed_dependency_cancels_its_dependants_one_level_per_decision():
    cluster = simple_cluster(("t1", 5, []), ("t2", 5, ["t1"]), ("t3", 5, ["t2"]))
    spec = cluster.fold.tasks["t1"].spec
    a = {"time": T0, "run_id": RUN, "task_id": "t1", "attempt": 1, "worker_id": "w1"}
    cluster.publish(ev.TaskAssigned(id="as-t1", **a, coordinator="c", spec=spec))
    cluster.publish(ev.ResultReported(id="res-t1", **a, outcome="failed"))
    [cancel] = decide(cluster.fold)
    assert isinstance(cancel, ev.TaskCancelled) and cancel.task_id == "t2"
    assert cancel.reason == "dependency t1 ended failed"
    cluster.publish(cancel)
    [cancel] = decide(cluster.fold)
    assert cancel.task_id == "t3" and cancel.reason == "dependency t2 ended cancelled"


def test_a_worker_that_hands_work_back_at_capacity_gets_none_for_a_while_and_again_once_one_settles():
    cluster = simple_cluster(("t1", 5, []), ("t2", 5, []), concurrency=2)
    spec = cluster.fold.tasks["t1"].spec
    first = {"run_id": RUN, "task_id": "t1", "attempt": 1, "worker_id": "w1"}
    cluster.publish(ev.TaskAssigned(id="as-t1", time=NOW, **first, coordinator="c", spec=spec))
    # w1 still runs something this fold does not know of (an attempt from before it was declared lost)
    cluster.publish(ev.TaskReleased(id="rel-t1", time=NOW, **first, reason=f"{AT_CAPACITY} (2)"))
    at = NOW + FULL_BACKOFF / 2
    assert list(schedule.decide(cluster.fold, at, "coord", POLICY)) == []  # not straight back to it
    later = [(d.task_id, d.worker_id) for d in schedule.decide(cluster.fold, NOW + FULL_BACKOFF, "coord", POLICY)]
    assert later == [("t1", "w1"), ("t2", "w1")]
    second = {"run_id": RUN, "task_id": "t2", "attempt": 1, "worker_id": "w1"}
    cluster.publish(ev.TaskAssigned(id="as-t2", time=NOW, **second, coordinator="c", spec=spec))
    cluster.publish(ev.TaskReleased(id="rel-t2", time=NOW, **second, reason=f"{AT_CAPACITY} (2)"))
    third = {"run_id": RUN, "task_id": "t1", "attempt": 2, "worker_id": "w1"}
    cluster.publish(ev.TaskAssigned(id="as-t1-2", time=NOW, **third, coordinator="c", spec=spec))
    cluster.publish(ev.ResultReported(id="res-t1-2", time=NOW, **third, outcome="passed"))  # a slot came free
    assert [(d.task_id, d.worker_id) for d in schedule.decide(cluster.fold, at, "coord", POLICY)] == [("t2", "w1")]


def test_a_dependant_waits_until_its_dependency_passed():
    cluster = simple_cluster(("t1", 5, []), ("t2", 1, ["t1"]), concurrency=2)
    assert [d.task_id for d in decide(cluster.fold)] == ["t1"]
    spec = cluster.fold.tasks["t1"].spec
    a = {"time": NOW, "run_id": RUN, "task_id": "t1", "attempt": 1, "worker_id": "w1"}
    cluster.publish(ev.TaskAssigned(id="as-t1", **a, coordinator="c", spec=spec))
    assert decide(cluster.fold) == []
    cluster.publish(ev.ResultReported(id="res-t1", **a, outcome="passed"))
    assert [(d.task_id, d.attempt) for d in decide(cluster.fold)] == [("t2", 1)]


@pytest.mark.parametrize("hardware, gpus, req, ok", [
    (["cpu", "cuda"], [7.5], Requirements(hardware=["cuda", "rocm"]), True),
    (["cpu"], [], Requirements(hardware=["cuda", "rocm"]), False),
    (["cpu", "cuda"], [7.0], Requirements(hardware=["cuda"], min_cuda_compute=7.5), False),
    (["cpu", "cuda"], [7.0, 8.6], Requirements(min_cuda_compute=7.5), True),
    (["cpu"], [], Requirements(min_memory_gb=8), True),     # the worker offers 16 GB
    (["cpu"], [], Requirements(min_memory_gb=32), False),
    (["cpu"], [], Requirements(tags={"os": "linux"}), True),
    (["cpu"], [], Requirements(tags={"os": "mac"}), False),
])
def test_capability_matching_follows_the_seeds_rules(hardware, gpus, req, ok):
    caps = ev.Capabilities(hardware=hardware, memory_gb=16, tags={"os": "linux"},
                           gpus=[ev.Gpu(name="g", memory_gb=16, cuda_compute=c) for c in gpus])
    worker = Fold()
    worker.apply(subjects.worker("w1", "registered"), 1, ev.encode(ev.WorkerRegistered(
        id="r", time=T0, worker_id="w1", host="h", pid=1, capabilities=caps)))
    assert schedule.capable(worker.workers["w1"], req) is ok is meets(caps, req)
