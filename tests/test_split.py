"""Splitting a suite into shards by history: pure properties, no server."""

from __future__ import annotations

import itertools

import click
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from dtf import split
from dtf.cli.collection import parse_collection
from dtf.cli.splitting import parse_split

files = st.sampled_from(["tests/test_a.py", "tests/sub/test_b.py", "test_c.py", "tests/test_d.py"])
classes = st.sampled_from(["", "TestOne::", "TestTwo::"])
names = st.from_regex(r"test_[a-z]{1,6}(\[[a-z0-9:-]{1,4}\])?", fullmatch=True)
nodeid = st.builds(lambda f, c, n: f"{f}::{c}{n}", files, classes, names)
suites = st.lists(nodeid, min_size=1, max_size=60, unique=True)
durations = st.floats(min_value=0.0, max_value=30.0, allow_nan=False)
groups = st.sampled_from(split.GROUPS)
slot_counts = st.integers(min_value=1, max_value=9)


@st.composite
def suites_with_history(draw):
    ids = draw(suites)
    known = draw(st.lists(st.sampled_from(ids), unique=True)) if ids else []
    return ids, {n: draw(durations) for n in known}


@given(suites_with_history(), slot_counts, groups)
def test_every_collected_test_lands_in_exactly_one_shard(suite, slots, group):
    ids, history = suite
    shards = split.plan(ids, history, slots, group=group)
    placed = [n for shard in shards for n in shard.nodeids]
    assert sorted(placed) == sorted(ids)


@given(suites_with_history(), slot_counts, st.sampled_from(["class", "file"]))
def test_a_class_or_file_is_never_split_across_shards(suite, slots, group):
    ids, history = suite
    key = split.class_of if group == "class" else split.file_of
    home: dict[str, int] = {}
    for index, shard in enumerate(split.plan(ids, history, slots, group=group)):
        for n in shard.nodeids:
            assert home.setdefault(key(n), index) == index


@given(suites_with_history(), slot_counts, groups)
def test_the_same_input_gives_the_same_shards(suite, slots, group):
    ids, history = suite
    again = split.plan(list(ids), dict(history), slots, group=group)
    assert split.plan(ids, history, slots, group=group) == again


@given(suites_with_history(), slot_counts)
def test_tests_inside_a_shard_keep_their_collection_order(suite, slots):
    ids, history = suite
    position = {n: i for i, n in enumerate(ids)}
    for shard in split.plan(ids, history, slots, group="test"):
        assert [position[n] for n in shard.nodeids] == sorted(position[n] for n in shard.nodeids)


@settings(max_examples=300)
@given(st.lists(durations, min_size=1, max_size=80), slot_counts, st.sampled_from([0.0, 0.5, 2.0]))
def test_pulling_the_shards_in_order_ends_within_four_thirds_of_the_lower_bound_plus_one_unit(
        lengths, slots, min_shard_s):
    units = [split.Unit(f"u{i}", (f"t.py::u{i}",), d) for i, d in enumerate(lengths)]
    shards = split.pack(units, slots, min_shard_s=min_shard_s)
    makespan = split.pull_makespan([s.estimate_s for s in shards], slots)
    bound = 4 / 3 * split.lower_bound(lengths, slots) + max(lengths) + min_shard_s
    assert makespan <= bound + 1e-9


@example([0.0, 0.0], 2)  # nothing estimated still makes a shard per worker
@given(st.lists(durations, min_size=1, max_size=80), st.integers(min_value=2, max_value=9))
def test_tail_shards_get_smaller_so_the_queue_steals_work_at_the_end(lengths, slots):
    units = [split.Unit(f"u{i}", (f"t.py::u{i}",), d) for i, d in enumerate(lengths)]
    shards = split.pack(units, slots, min_shard_s=0.0)
    tail = [s.estimate_s for s in shards[slots:]]
    biggest_unit_left = max((d for d in lengths), default=0.0)
    # a later tail shard is never bigger than an earlier one by more than one unit (a unit is indivisible)
    for earlier, later in itertools.pairwise(tail):
        assert later <= earlier + biggest_unit_left + 1e-9
    assert len(shards) >= min(slots, len(lengths))


def test_a_long_file_is_cut_by_class_and_test_only_under_auto_and_only_when_it_would_hurt_the_balance():
    ids = [*(f"test_big.py::TestSlow::test_{i}" for i in range(4)), "test_small.py::test_x",
           "test_small.py::test_y"]
    history = {**{n: 10.0 for n in ids[:4]}, "test_small.py::test_x": 1.0, "test_small.py::test_y": 1.0}
    by_file = split.plan(ids, history, 2, group="file")
    assert any(set(ids[:4]) <= set(s.nodeids) for s in by_file)
    auto = split.plan(ids, history, 2, group="auto")
    homes = {next(i for i, s in enumerate(auto) if n in s.nodeids) for n in ids[:4]}
    assert len(homes) == 2
    small = {next(i for i, s in enumerate(auto) if n in s.nodeids) for n in ids[4:]}
    assert len(small) == 1  # a short file stays whole


def test_history_recorded_relative_to_another_rootdir_still_matches_the_longest_suffix():
    ids = ["tests/a/test_x.py::t", "tests/b/test_x.py::t", "tests/test_y.py::u"]
    history = {"a/test_x.py::t": 3.0, "test_x.py::t": 1.0, "tests/test_y.py::u": 2.0}
    assert split.match_history(ids, history) == {
        "tests/a/test_x.py::t": 3.0, "tests/b/test_x.py::t": 1.0, "tests/test_y.py::u": 2.0}


def test_an_unknown_test_is_estimated_from_its_file_then_the_suite_then_the_prior():
    ids = ["a.py::known", "a.py::new", "b.py::new", "c.py::x"]
    known = {"a.py::known": 4.0, "c.py::x": 2.0}
    assert split.estimates(ids, known) == {
        "a.py::known": 4.0, "a.py::new": 4.0, "b.py::new": 3.0, "c.py::x": 2.0}
    assert split.estimates(["z.py::t"], {}) == {"z.py::t": split.PRIOR_S}


def test_history_balances_a_suite_the_prior_cannot():
    slow = [f"test_slow.py::test_{i}" for i in range(10)]
    fast = [f"test_fast.py::test_{i}" for i in range(10)]
    truth = {**{n: 1.0 for n in slow}, **{n: 0.01 for n in fast}}

    def makespan(history):
        shards = split.plan(slow + fast, history, 2)
        return split.pull_makespan([sum(truth[n] for n in s.nodeids) for s in shards], 2)

    assert makespan(truth) < makespan({})  # without history ten slow tests look like ten fast ones
    assert makespan(truth) <= 1.15 * split.lower_bound(list(truth.values()), 2)


def test_the_collected_node_ids_are_the_lines_before_pytests_summary():
    ids = ["tests/test_a.py::test_x", "tests/test_a.py::T::test_y[1-2]", "test_doc.txt"]
    output = "\n".join(ids) + "\n\n3 tests collected in 0.01s\n"
    assert parse_collection(output) == ids


def test_split_takes_auto_or_a_positive_number_of_slots():
    assert parse_split("auto") is None
    assert parse_split("3") == 3
    for bad in ("0", "-1", "two"):
        with pytest.raises(click.BadParameter):
            parse_split(bad)


def test_a_slower_worker_takes_fewer_tail_shards_so_the_run_ends_sooner_than_with_one_shard_per_worker():
    ids = [f"test_m{i:02d}.py::test" for i in range(40)]
    history = {n: 1.0 for n in ids}
    speed = [2.0, 1.0]  # worker 0 runs everything twice as slowly as recorded

    def makespan(shards):
        free = [0.0, 0.0]
        for shard in shards:  # each shard goes to whichever worker is free first
            w = min(range(2), key=lambda i: (free[i], i))
            free[w] += shard.estimate_s * speed[w]
        return max(free)

    one_each = split.pack(split.units(ids, history, "test", 2), 2, core_fraction=1.0, min_shard_s=1000)[:2]
    assert sum(len(s.nodeids) for s in one_each) == 40
    ours = split.plan(ids, history, 2, group="test")
    assert makespan(ours) < makespan(one_each)


@given(st.lists(st.sampled_from([f"t/test_{i}.py" for i in range(12)]), min_size=1, max_size=12, unique=True),
       st.dictionaries(st.sampled_from([f"t/test_{i}.py::test_{j}" for i in range(12) for j in range(3)]),
                       durations, max_size=36),
       slot_counts)
def test_a_split_by_file_puts_every_file_in_one_shard_or_declines(files, history, slots):
    shards = split.plan_files(files, history, slots, group="file")
    known = {split.file_of(n) for n in history} & set(files)
    if 2 * len(known) < len(files):
        assert shards is None  # mostly unknown: collecting plans better
        return
    assert shards is not None
    assert sorted(f for s in shards for f in s.nodeids) == sorted(files)
    total = sum(s.estimate_s for s in shards)
    expected = sum(history[n] + split.TEST_OVERHEAD_S for n in history if split.file_of(n) in files)
    assert total >= expected - 1e-9  # unknown files add their guess on top


def test_a_split_by_file_guesses_unknown_files_and_declines_what_auto_would_cut():
    history = {"a/test_x.py::t": 1.0, "b/test_y.py::t": 1.2, "test_z.py::t": 0.8, "test_w.py::t": 1.0}
    files = ["tests/a/test_x.py", "tests/b/test_y.py", "tests/test_z.py", "tests/test_w.py", "tests/test_new.py"]
    shards = split.plan_files(files, history, 2, group="auto")  # recorded under another rootdir: by suffix
    assert sorted(f for s in shards for f in s.nodeids) == sorted(files)
    assert sum(s.estimate_s for s in shards) == pytest.approx(1 + 1.2 + 0.8 + 1 + 1 + 5 * split.TEST_OVERHEAD_S)
    long_one = {**history, "c/test_big.py::t": 100.0}
    files = ["a/test_x.py", "b/test_y.py", "test_z.py", "c/test_big.py"]
    assert split.plan_files(files, long_one, 2, group="auto") is None  # auto would cut test_big.py
    assert split.plan_files(files, long_one, 2, group="file") is not None
    assert split.plan_files(files, long_one, 2, group="test") is None
