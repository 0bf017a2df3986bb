"""The slab worker's pull-mode failure policy on the decode side (kvtransfer/worker_side.py), pinned
step by step against ``ScriptedNixl``, a stand-in for NixlTransport whose peers, READ outcomes and
notification failures the test decides (no NIXL, no vLLM engine). Every failure ends in
finished_recving + failed_recving (vLLM recomputes the prompt) and a stats failure reason; the
prefill hears about it (a release notification, its request id) whenever its agent is reachable.
Also the pure state objects the worker drives (kvtransfer/transfers.py)."""

from __future__ import annotations

import pytest
import torch

from kvtransfer.config import SlabConnectorSettings
from kvtransfer.metadata import RecvJob, SlabConnectorMetadata
from kvtransfer.push_sender import PushSender
from kvtransfer.transfers import PushSend, PushState, Receive, ReceiveState
from kvtransfer.transport import TransferState
from kvtransfer.wire import PROTOCOL_VERSION, SlabDesc, SlabHandoff
from kvtransfer.worker_side import SlabConnectorWorker

LAYERS, HEADS, HEAD_DIM, BLOCK = 2, 3, 64, 32
SETTINGS = dict(
    pool_mib=2, prefault_pool=False, huge_pages=False, connect_timeout_s=2.0, read_timeout_s=5.0, expiry_margin_s=1.0
)
DEADLINE = 100.0  # the prefill's handoff deadline (wall clock)


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


class ScriptedNixl:
    """NixlTransport stand-in for one decode engine: ``reachable`` peers count as connected; every READ
    ends in ``read_outcome`` ("done", "pending", "failed") or raises when posted ("raise"); the test
    moves a pending READ on through ``states``. Records connects, forgets, READs, releases, notifications."""

    name = "D"

    def __init__(self):
        self.reachable: set[str] = set()
        self.read_outcome = "done"
        self.notify_raises = False
        self.connects: list[str] = []
        self.forgotten: list[str] = []
        self.reads: list[tuple[str, int, bytes]] = []  # (peer, descriptors, notification)
        self.states: dict[int, TransferState] = {}
        self.released: list[int] = []
        self.notes: list[tuple[str, bytes]] = []

    def register_pool(self, pool):
        self.pool = pool

    def listen_address(self):
        return "127.0.0.1", 1

    def connect(self, peer, host, port):
        self.connects.append(peer)

    def is_connected(self, peer):
        return peer in self.reachable

    def forget(self, peer):
        self.forgotten.append(peer)

    def read(self, peer, local, remote, notify):
        if self.read_outcome == "raise":
            raise RuntimeError("NIXL READ failed to start")
        handle = len(self.reads)
        self.reads.append((peer, len(remote), notify))
        self.states[handle] = {
            "done": TransferState.DONE,
            "pending": TransferState.PENDING,
            "failed": TransferState.FAILED,
        }[self.read_outcome]
        return handle

    def write(self, peer, local, remote, notify):
        raise AssertionError("pull mode never writes")

    def poll(self, handle):
        return self.states[handle]

    def release(self, handle):
        self.released.append(handle)

    def notify(self, peer, message):
        if self.notify_raises:
            raise RuntimeError("peer gone")
        self.notes.append((peer, message))

    def drain_notifications(self):
        return []

    def close(self):
        pass


@pytest.fixture
def decode():
    """(worker, nixl, clock, wall) of a decode engine at t=0, wall time 90 (10 s before DEADLINE)."""
    nixl, clock, wall = ScriptedNixl(), Clock(0.0), Clock(DEADLINE - 10)
    w = SlabConnectorWorker(SlabConnectorSettings(**SETTINGS), "D", lambda: nixl, clock=clock, wall_clock=wall)
    w.register_kv_caches(
        {f"model.layers.{i}.self_attn.attn": torch.zeros(8, HEADS, BLOCK, 2 * HEAD_DIM) for i in range(LAYERS)}
    )
    return w, nixl, clock, wall


def _handoff(**kw) -> SlabHandoff:
    """A handoff of this file's geometry; ``kw`` sets the fields a test cares about."""
    base = dict(
        version=PROTOCOL_VERSION,
        engine_id="P",
        request_id="p1",
        host="10.0.0.2",
        port=7,
        num_tokens=90,
        block_size=BLOCK,
        dtype="float32",
        num_layers=LAYERS,
        num_kv_heads=HEADS,
        head_dim=HEAD_DIM,
        k_transposed=True,
        compression="none",
        group=32,
        deadline_unix_s=DEADLINE,
    )
    return SlabHandoff(**(base | kw))


def _job(w, req_id="d1", offset=0, fail=None) -> RecvJob:
    handoff = _handoff(slabs=[SlabDesc(1 << 40, w._codecs["none"].wire_nbytes(3), 0, 3)])
    return RecvJob(req_id, handoff, (1, 2, 3), first_block=0, offset=offset, fail=fail)


def _step(w, *jobs):
    """One engine step's connector calls on the decode worker; returns (finished_recving, failed_recving)."""
    meta = SlabConnectorMetadata(recvs=list(jobs))
    w.start_load_kv(meta)
    w.wait_for_save(meta)
    sending, recving, failed = w.get_transfer_results()
    assert sending == set()
    return recving, failed


RELEASE = ("P", b"p1")  # the release notification: the prefill's request id


class TestPullFailurePolicy:
    def test_a_read_done_at_post_loads_and_sends_nothing_else(self, decode):
        w, nixl, _, _ = decode
        nixl.reachable.add("P")
        assert _step(w, _job(w)) == ({"d1"}, set())
        assert nixl.reads == [("P", 1, b"p1")] and nixl.released == [0]
        assert nixl.notes == []  # the READ itself notifies the prefill
        st = w.take_stats()
        assert st.num_handoffs_received == 1 and st.failures == {}

    def test_read_timeout_counts_from_the_reads_post_and_releases(self, decode):
        w, nixl, clock, _ = decode
        nixl.read_outcome = "pending"
        assert _step(w, _job(w)) == (set(), set())
        clock.t = 1.5  # the peer's metadata arrives: READ posted at 1.5
        nixl.reachable.add("P")
        assert _step(w) == (set(), set())
        clock.t = 6.4  # 5 s after the job, 4.9 s after the post
        assert _step(w) == (set(), set()) and nixl.released == []
        clock.t = 6.5  # read_timeout_s after the post
        assert _step(w) == ({"d1"}, {"d1"})
        assert nixl.released == [0] and nixl.notes == [RELEASE]
        assert w.take_stats().failures == {"read_timeout": 1}
        assert _step(w) == (set(), set())  # reported once

    def test_unreachable_prefill_fails_at_connect_timeout_without_a_notification(self, decode):
        w, nixl, clock, _ = decode
        assert _step(w, _job(w)) == (set(), set()) and nixl.connects == ["P"]
        clock.t = 1.9
        assert _step(w) == (set(), set())
        clock.t = 2.0  # connect_timeout_s
        assert _step(w) == ({"d1"}, {"d1"})
        assert nixl.reads == [] and nixl.notes == [] and nixl.forgotten == ["P"]
        assert w.take_stats().failures == {"connect_timeout": 1}
        _step(w, _job(w, "d2"))  # the next handoff from that prefill tries again
        assert nixl.connects == ["P", "P"]

    @pytest.mark.parametrize("before, reads", [(0.0, 1), (-0.01, 0)])
    def test_expiry_margin(self, decode, before, reads):
        """A READ starts up to expiry_margin_s before the prefill's deadline, never later."""
        w, nixl, _, wall = decode
        nixl.reachable.add("P")
        wall.t = DEADLINE - SETTINGS["expiry_margin_s"] - before
        recving, failed = _step(w, _job(w))
        assert recving == {"d1"} and len(nixl.reads) == reads
        if reads:
            assert failed == set() and nixl.notes == []
        else:
            assert failed == {"d1"} and nixl.notes == [RELEASE]  # the peer is connected: told at once
            assert w.take_stats().failures == {"expired": 1}

    def test_expired_handoff_of_an_unconnected_prefill_is_not_connected_to(self, decode):
        w, nixl, _, wall = decode
        wall.t = DEADLINE
        assert _step(w, _job(w)) == ({"d1"}, {"d1"})
        assert nixl.connects == [] and nixl.notes == []

    @pytest.mark.parametrize("outcome", ["raise", "failed"])
    def test_read_error_releases_and_notifies(self, decode, outcome):
        w, nixl, _, _ = decode
        nixl.reachable.add("P")
        nixl.read_outcome = outcome
        assert _step(w, _job(w)) == ({"d1"}, {"d1"})
        assert nixl.released == ([] if outcome == "raise" else [0]) and nixl.notes == [RELEASE]
        assert w.take_stats().failures == {"read_error": 1}

    @pytest.mark.parametrize("reachable", [True, False])
    def test_a_job_the_scheduler_failed_is_reported_at_once(self, decode, reachable):
        w, nixl, _, _ = decode
        if reachable:
            nixl.reachable.add("P")
        assert _step(w, _job(w, fail="pool_full")) == ({"d1"}, {"d1"})
        assert nixl.connects == [] and nixl.notes == ([RELEASE] if reachable else [])
        assert w.take_stats().failures == {"pool_full": 1}

    def test_decode_error_fails_without_a_second_notification(self, decode, monkeypatch):
        w, nixl, _, _ = decode
        nixl.reachable.add("P")

        def broken(job, slabs):
            raise ValueError("bad slab")

        monkeypatch.setattr(w._unpacker, "unpack", broken)
        assert _step(w, _job(w)) == ({"d1"}, {"d1"})
        assert nixl.released == [0] and nixl.notes == []
        assert w.take_stats().failures == {"decode_error": 1}

    def test_a_failing_release_notification_still_reports_the_failure(self, decode):
        w, nixl, _, _ = decode
        nixl.reachable.add("P")
        nixl.read_outcome, nixl.notify_raises = "failed", True
        assert _step(w, _job(w)) == ({"d1"}, {"d1"})
        assert w.take_stats().failures == {"read_error": 1}

    def test_nothing_to_load_only_releases_once_the_prefill_is_reachable(self, decode):
        w, nixl, clock, _ = decode
        assert _step(w, _job(w, offset=None)) == (set(), set()) and nixl.connects == ["P"]
        clock.t = 1.0
        nixl.reachable.add("P")
        assert _step(w) == (set(), set()) and nixl.notes == [RELEASE]
        _step(w)
        assert nixl.notes == [RELEASE] and w.take_stats() is None  # sent once; not a failure

    def test_nothing_to_load_gives_up_an_unreachable_prefill_after_connect_timeout(self, decode):
        w, nixl, clock, _ = decode
        _step(w, _job(w, offset=None))
        clock.t = 2.0
        _step(w)
        nixl.reachable.add("P")  # too late: the release was given up
        _step(w)
        assert nixl.notes == [] and w._releases == []


class TestTransferStates:
    def test_receive_peer_and_mode(self, decode):
        w = decode[0]
        r = Receive(_job(w), deadline=2.0, started_s=0.0)
        assert (r.state, r.peer, r.is_push) == (ReceiveState.CONNECTING, "P", False)

    @pytest.mark.parametrize("reservation_first", [True, False])
    def test_push_send_is_ready_once_pack_and_reservation_are_both_here(self, reservation_first):
        res = _job_handoff()
        send = PushSend("rv")
        if reservation_first:
            send.on_reservation(res)
            assert send.state is PushState.AWAITING_PACK
            send.on_packed(object(), [(1, 2)])
        else:
            send.on_packed(object(), [(1, 2)])
            assert send.state is PushState.AWAITING_RESERVATION
            send.on_reservation(res)
        assert send.state is PushState.CONNECTING and send.reservation is res and send.local == [(1, 2)]

    def test_a_new_reservation_does_not_move_a_write_back(self):
        send = PushSend("rv", state=PushState.WRITING)
        send.on_reservation(_job_handoff())
        assert send.state is PushState.WRITING


class TestPushSender:
    def test_a_reservation_without_its_pack_is_not_busy_and_expires_after_the_write_window(self):
        wall, fails = Clock(DEADLINE), []
        sender = PushSender(SlabConnectorSettings(**SETTINGS), Clock(0.0), wall, fails.append)
        sender.transport = ScriptedNixl()
        sender.on_reservation(_job_handoff())
        assert not sender.busy() and sender.pushes["rv"].state is PushState.AWAITING_PACK
        wall.t = DEADLINE + SETTINGS["expiry_margin_s"]
        sender.advance()
        assert set(sender.pushes) == {"rv"}
        wall.t += 0.01
        sender.advance()
        assert sender.pushes == {} and sender.take_pushed() == set() and fails == []


def _job_handoff() -> SlabHandoff:
    return _handoff(engine_id="D", request_id="rv", host="h", port=1, num_tokens=1)
