"""Schedules: monotone targets that hit the final sparsity exactly at the end, due only at
their milestones, and clear ScheduleErrors for impossible schedules."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import prunekit as pk
from prunekit.schedules import Cubic, Iterative, OneShot

ints = st.integers(0, 30)
every = st.integers(1, 7)
schedules = st.one_of(
    st.builds(OneShot, at=st.integers(1, 30)),
    st.builds(
        Iterative,
        steps=st.integers(1, 6),
        every=every,
        start=ints,
        spacing=st.sampled_from(["equal", "geometric"]),
    ),
    st.builds(
        lambda start, n, every, initial: Cubic(start, start + n * every, every, initial),
        ints,
        st.integers(1, 6),
        every,
        st.floats(0.0, 0.45),
    ),
)


def first_and_every(s) -> tuple[int, int]:
    if isinstance(s, OneShot):
        return s.at, 1
    return (s.start + s.every if isinstance(s, Iterative) else s.start), s.every


@settings(max_examples=200, deadline=None)
@given(schedule=schedules, final=st.floats(0.5, 0.99))
def test_targets_grow_to_final_exactly_at_end_and_due_only_at_milestones(schedule, final):
    first, step_every = first_and_every(schedule)
    targets = [schedule.target(t, final) for t in range(schedule.end + 10)]
    assert all(a <= b for a, b in pairwise(targets))
    assert targets[schedule.end] == final and targets[-1] == final
    assert all(t < final for t in targets[: schedule.end])
    assert all(t == 0.0 for t in targets[:first])
    for t in range(schedule.end + 10):
        due = first <= t <= schedule.end and (t - first) % step_every == 0
        assert schedule.due(t) == due
        if t > 0 and not due:  # between milestones the target holds
            assert targets[t] == targets[t - 1]


def test_cubic_follows_zhu_gupta():
    s = Cubic(start=10, end=110, every=20, initial=0.1)
    assert s.target(9, 0.9) == 0.0
    assert s.target(10, 0.9) == pytest.approx(0.1)
    assert s.target(70, 0.9) == pytest.approx(0.9 + (0.1 - 0.9) * (1 - 60 / 100) ** 3)
    assert s.target(89, 0.9) == s.target(70, 0.9)


def test_iterative_spacings():
    equal = [Iterative(4, 10).target(t, 0.8) for t in (10, 20, 30, 40)]
    assert equal == pytest.approx([0.2, 0.4, 0.6, 0.8])
    geo = [Iterative(4, 10, spacing="geometric").target(t, 0.9375) for t in (10, 20, 30, 40)]
    assert geo == pytest.approx([0.5, 0.75, 0.875, 0.9375])  # half the survivors each round


BAD = [
    (lambda: Cubic(start=10, end=5, every=1), r"end=5 must be an int >= 11"),
    (lambda: Cubic(start=0, end=10, every=10, initial=1.0), pk.InvalidSparsityError),
    (lambda: Cubic(start=0, end=95, every=10), r"not a multiple of every=10.*end=90 or end=100"),
    (lambda: Cubic(start=-1, end=5, every=1), r"start=-1"),
    (lambda: Cubic(start=0, end=10, every=0), r"every=0 must be an int >= 1"),
    (lambda: Iterative(steps=0, every=5), r"steps=0"),
    (lambda: Iterative(steps=3, every=-2), r"every=-2"),
    (lambda: Iterative(steps=True, every=2), r"steps=True"),
    (lambda: Iterative(steps=3, every=2.5), r"every=2\.5"),
    (lambda: Iterative(steps=3, every=2, spacing="log"), r"spacing='log'.*equal, geometric"),
    (lambda: OneShot(at=0), r"at=0"),
    (lambda: Cubic(0, 10, 5, initial=0.5).target(5, 0.3), r"initial=0\.5 is above the target"),
    (lambda: OneShot().target(1, 1.5), pk.InvalidSparsityError),
]


@pytest.mark.parametrize(("make", "expected"), BAD)
def test_bad_schedules_raise(make, expected):
    if isinstance(expected, str):
        with pytest.raises(pk.errors.ScheduleError, match=expected):
            make()
    else:
        with pytest.raises(expected):
            make()


def test_schedules_are_frozen():
    with pytest.raises(AttributeError):
        Cubic(0, 10, 5).every = 2
