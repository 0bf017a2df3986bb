"""router/tier_activity.py: which tiers are active, on a fake clock (pure)."""

import pytest

from router.tier_activity import TierActivity


class FakeClock:
    """A settable stand-in for time.monotonic."""

    def __init__(self, t: float = 0.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


def test_a_tier_is_active_for_idle_s_after_its_latest_arrival():
    clock = FakeClock(100.0)
    a = TierActivity(30.0, clock)
    assert a.active() == frozenset()  # nothing seen yet: every tier idle
    a.arrive("premium")
    clock.t = 110.0
    a.arrive("free")
    clock.t = 130.0
    assert a.active() == {"premium", "free"}  # premium exactly 30 s ago still counts
    clock.t = 130.5
    assert a.active() == {"free"}
    a.arrive("premium")  # a new arrival takes it back at once
    assert a.active() == {"premium", "free"}
    clock.t = 160.6
    assert a.active() == frozenset()


def test_busy_tiers_are_active_without_a_recent_arrival():
    clock = FakeClock()
    a = TierActivity(5.0, clock)
    a.arrive("standard")
    clock.t = 60.0
    assert a.active(busy={"premium"}) == {"premium"}
    assert a.active(busy=()) == frozenset()


def test_zero_window_and_bad_window():
    clock = FakeClock(1.0)
    a = TierActivity(0.0, clock)
    a.arrive("free")
    assert a.active() == {"free"}  # at the instant of the arrival only
    clock.t = 1.001
    assert a.active() == frozenset()
    with pytest.raises(ValueError):
        TierActivity(-1.0, clock)
