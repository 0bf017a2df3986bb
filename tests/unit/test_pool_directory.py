from router.types import Role
from serve.pool_directory import PoolDirectory, endpoint_from_stats


class FakeSource:
    """A fake stand-in for a Serve request router's replica list."""

    def __init__(self, *ids):
        self.ids = ids

    def endpoints(self):
        return [endpoint_from_stats(i, "decode", Role.DECODE, None) for i in self.ids]


class TestPoolDirectory:
    def test_unpolled_replica_is_routable(self):
        d = PoolDirectory(clock=lambda: 100.0)
        d.register("decode", FakeSource("a"))
        (e,) = d.snapshot().endpoints
        assert e.healthy and e.endpoint_id == "a"

    def test_polled_stats_and_in_flight(self):
        d = PoolDirectory(clock=lambda: 100.0)
        d.register("decode", FakeSource("a"))
        d.update_stats("a", {"healthy": True, "num_running": 3, "num_waiting": 2, "kv_usage": 0.5, "updated_s": 99.0})
        (e,) = d.snapshot({"a": 7}).endpoints
        assert (e.num_running, e.num_waiting, e.kv_usage, e.in_flight, e.load) == (3, 2, 0.5, 7, 7)

    def test_queued_work_by_priority_and_the_engines_step_budget(self):
        from serve.orchestrator import Orchestrator

        d = PoolDirectory(clock=lambda: 100.0)
        d.register("decode", FakeSource("a"))
        d.update_stats("a", {"healthy": True, "priority_step_tokens": 2048, "updated_s": 99.0})
        orch = Orchestrator({}, policy=None, directory=d, metrics=None, prefill_timeout_s=60.0, idle_timeout_s=600.0)
        free = [orch._reserve("a", 300, priority=-10), orch._reserve("a", 200, priority=-10)]
        premium = orch._reserve("a", 50, priority=-100)
        (e,) = orch.snapshot().endpoints
        assert (e.queued_prefill_tokens, e.queued_prefill_by_priority) == (550, ((-100, 50), (-10, 500)))
        assert e.priority_step_tokens == 2048 and e.prefill_tokens_ahead(-100) == 550
        premium(), premium(), free[0]()  # releases are idempotent
        (e,) = orch.snapshot().endpoints
        assert (e.queued_prefill_tokens, e.queued_prefill_by_priority) == (200, ((-10, 200),))
        free[1]()
        assert orch.queued_by_priority() == {} and orch.snapshot().endpoints[0].queued_prefill_tokens == 0

    def test_stale_polls_make_unhealthy(self):
        now = [100.0]
        d = PoolDirectory(clock=lambda: now[0], stale_s=10.0)
        d.register("decode", FakeSource("a"))
        d.update_stats("a", {"healthy": True, "updated_s": 100.0})
        assert d.snapshot().endpoints[0].healthy
        now[0] = 111.0
        assert not d.snapshot().endpoints[0].healthy

    def test_engine_reported_unhealthy(self):
        d = PoolDirectory(clock=lambda: 100.0)
        d.register("decode", FakeSource("a"))
        d.update_stats("a", {"healthy": False, "updated_s": 100.0})
        assert not d.snapshot().endpoints[0].healthy

    def test_a_suspect_is_unhealthy_until_a_later_snapshot_vouches_for_it(self):
        now = [100.0]
        d = PoolDirectory(clock=lambda: now[0])
        d.register("decode", FakeSource("a", "b"))
        d.update_stats("a", {"healthy": True, "updated_s": 100.0, "reported_s": 99.9})
        d.suspect("a")  # a call to it just failed
        d.suspect("b")  # (b was never polled)
        healthy = lambda: {e.endpoint_id: e.healthy for e in d.snapshot().endpoints}  # noqa: E731
        assert healthy() == {"a": False, "b": False}
        now[0] = 100.5  # a poll sent before the failure answers after it: still suspect
        d.update_stats("a", {"healthy": True, "updated_s": 100.5, "reported_s": 99.95})
        assert healthy() == {"a": False, "b": False}
        d.update_stats("a", {"healthy": True, "updated_s": 101.0, "reported_s": 100.8})
        assert healthy() == {"a": True, "b": False}

    def test_removed_replicas_are_forgotten(self):
        d = PoolDirectory(clock=lambda: 100.0)
        src = FakeSource("a", "b")
        d.register("decode", src)
        d.update_stats("b", {"updated_s": 100.0})
        src.ids = ("a",)
        assert [e.endpoint_id for e in d.snapshot().endpoints] == ["a"]
        assert "b" not in d._polled
