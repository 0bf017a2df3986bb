"""Pure parts of the slab connector: handoff params, pool ranges, scheduler-side bookkeeping, the
prefill ledger's timeouts (injected clock), a prefill->decode worker round trip over an in-process
FakeTransport (no NIXL), and stats aggregate/reduce. Real engines + NIXL: tests/integration/."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from kvtransfer.config import SlabConnectorSettings
from kvtransfer.ledger import PrefillLedger
from kvtransfer.metadata import SlabHandshake
from kvtransfer.scheduler_side import SlabConnectorScheduler
from kvtransfer.slab import RangeAllocator, SlabSpec
from kvtransfer.stats import KVTransferStats
from kvtransfer.transfers import PushState
from kvtransfer.transport import TransferState
from kvtransfer.wire import PROTOCOL_VERSION, SlabDesc, SlabHandoff
from kvtransfer.worker_side import SlabConnectorWorker
from tests.conftest import REPO

GEOM = {"num_layers": 4, "num_kv_heads": 3, "head_dim": 64}
BS = 32


class FakeClock:
    def __init__(self, t: float = 1000.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


class FakeTransport:
    """In-process stand-in for NixlTransport: peers share one registry; reads copy pool bytes."""

    def __init__(self, name: str, registry: dict, reachable: bool = True, fail_reads: bool = False):
        self.name, self.registry, self.reachable, self.fail_reads = name, registry, reachable, fail_reads
        self.pool = None
        self.inbox: list[tuple[str, bytes]] = []
        self.reads: list[int] = []  # descriptors per read
        self.writes: list[int] = []  # descriptors per write (push)
        self.connected: set[str] = set()

    def register_pool(self, pool):
        assert self.pool is None
        self.pool = pool
        self.registry[self.name] = self

    def listen_address(self):
        return "127.0.0.1", 1

    def connect(self, peer, host, port):
        if self.reachable and peer in self.registry:
            self.connected.add(peer)

    def is_connected(self, peer):
        return peer in self.connected

    def _view(self, addr, n):
        off = addr - self.pool.data_ptr()
        assert 0 <= off and off + n <= self.pool.numel()
        return self.pool[off : off + n]

    def read(self, peer, local, remote, notify):
        self.reads.append(len(remote))
        if self.fail_reads:
            return "failed"
        src = self.registry[peer]
        for (la, n), (ra, m) in zip(local, remote):
            assert n == m
            self._view(la, n).copy_(src._view(ra, m))
        src.inbox.append((self.name, notify))
        return "done"

    def write(self, peer, local, remote, notify):
        self.writes.append(len(remote))
        dst = self.registry[peer]
        for (la, n), (ra, m) in zip(local, remote):
            assert n == m
            dst._view(ra, m).copy_(self._view(la, n))
        dst.inbox.append((self.name, notify))
        return "done"

    def poll(self, handle):
        return TransferState.DONE if handle == "done" else TransferState.FAILED

    def release(self, handle):
        pass

    def notify(self, peer, message):
        self.registry[peer].inbox.append((self.name, message))

    def drain_notifications(self):
        out, self.inbox = self.inbox, []
        return out

    def close(self):
        pass


def _request(req_id, params, prompt_tokens, computed=0, status="RUNNING"):
    return SimpleNamespace(
        request_id=req_id,
        kv_transfer_params=params,
        num_prompt_tokens=prompt_tokens,
        num_computed_tokens=computed,
        status=SimpleNamespace(name=status),
    )


def _spec(**kw):
    return SlabSpec(**GEOM, block_size=BS, dtype_bytes=4, min_slab_tokens=kw.get("slab_tokens", 128))


def _handshake(name, pool_nbytes=64 << 20, addr=1 << 40):
    return SlabHandshake(name, "127.0.0.1", 5555, addr, pool_nbytes)


def _scheduler(name="P", blocks=None, clock=None, **settings):
    s = SlabConnectorScheduler(
        SlabConnectorSettings(**settings),
        name,
        _spec(),
        torch.float32,
        block_ids_of=lambda rid: blocks[rid],
        clock=clock or FakeClock(),
    )
    return s


def _handoff(**kw):
    base = dict(
        version=PROTOCOL_VERSION,
        engine_id="P",
        request_id="p1",
        host="127.0.0.1",
        port=5555,
        num_tokens=300,
        block_size=BS,
        dtype="float32",
        **GEOM,
        k_transposed=True,
        compression="none",
        group=32,
        deadline_unix_s=2000.0,
        slabs=[SlabDesc(1 << 40, 100, 0, 4), SlabDesc((1 << 40) + 100, 100, 4, 4), SlabDesc((1 << 40) + 200, 50, 8, 2)],
    )
    base.update(kw)
    return SlabHandoff(**base)


class TestHandoffParams:
    def test_round_trip(self):
        h = _handoff()
        params = h.to_kv_transfer_params()
        assert params["do_remote_prefill"] and params["remote_engine_id"] == "P" and params["remote_port"] == 5555
        assert SlabHandoff.from_kv_transfer_params(params) == h
        assert "p1" in repr(h) and "slabs=3" in repr(h)

    @pytest.mark.parametrize(
        "params",
        [
            None,
            {},
            {"do_remote_prefill": True},
            {"do_remote_prefill": True, "slab_handoff": {"version": 1}},
            {"do_remote_prefill": False, "slab_handoff": {}},
        ],
    )
    def test_absent_or_malformed_is_none(self, params):
        assert SlabHandoff.from_kv_transfer_params(params) is None

    def test_other_protocol_version_is_none(self):
        params = _handoff(version=PROTOCOL_VERSION + 1).to_kv_transfer_params()
        assert SlabHandoff.from_kv_transfer_params(params) is None


class TestRangeAllocator:
    def test_allocate_free_merge(self):
        a = RangeAllocator(16 * 4096)
        x, y, z = a.allocate(5000), a.allocate(4096), a.allocate(1)
        assert (x, y, z) == (0, 2 * 4096, 3 * 4096) and a.used_bytes == 4 * 4096
        a.free(y)
        assert a.allocate(8192) == 4 * 4096  # the hole of one page does not fit two
        a.free(x)
        assert a.allocate(3 * 4096) == 0  # x and y's ranges merged
        assert a.allocate(100 * 4096) is None
        with pytest.raises(KeyError):
            a.free(12345)


class TestSchedulerProducer:
    def _finish(self, s, req, status="FINISHED_LENGTH_CAPPED"):
        req.status = SimpleNamespace(name=status)
        return s.request_finished(req, [1, 2])

    def test_pack_publish_release(self):
        blocks = {"p1": list(range(100, 111))}
        s = _scheduler(blocks=blocks, handoff_timeout_s=7)
        s.set_handshake(_handshake("P"))
        req = _request("p1", {"do_remote_decode": True}, prompt_tokens=300)
        s.update_state_after_alloc(req, [], 0)
        meta = s.build_connector_meta({"p1": 256}, idle=False)  # chunk 1 of 2: nothing yet
        assert not meta.packs
        req.num_computed_tokens = 256
        meta = s.build_connector_meta({"p1": 44}, idle=False)
        (job,) = meta.packs
        assert job.block_ids == tuple(range(100, 110)) and job.slab_blocks == (4, 4, 2)  # 10 blocks
        delay, params = self._finish(s, req)
        assert delay is True
        h = SlabHandoff.from_kv_transfer_params(params)
        assert h.num_tokens == 300 and len(h.slabs) == 3 and h.deadline_unix_s == 1007.0
        assert h.slabs[0].addr == (1 << 40) + job.offset and sum(sl.nbytes for sl in h.slabs) == sum(job.slab_nbytes)
        assert s.build_connector_meta({}, idle=True).published == {"p1": 7}
        assert s.pool_bytes_in_use() > 0
        s.update_connector_output(finished_sending=["p1"], finished_recving=[])
        s.assert_empty()

    def test_per_request_compression(self):
        s = _scheduler(blocks={"p1": list(range(10))})
        s.set_handshake(_handshake("P"))
        req = _request("p1", {"do_remote_decode": True, "compression": "int4"}, prompt_tokens=128)
        s.update_state_after_alloc(req, [], 0)
        (job,) = s.build_connector_meta({"p1": 128}, idle=False).packs
        raw = 4 * BS * GEOM["num_layers"] * GEOM["num_kv_heads"] * 2 * GEOM["head_dim"] * 4
        assert job.compression == "int4" and sum(job.slab_nbytes) < 0.3 * raw / 2  # < 0.3x of bf16

    def test_aborted_request_frees_now(self):
        s = _scheduler(blocks={"p1": list(range(10))})
        s.set_handshake(_handshake("P"))
        req = _request("p1", {"do_remote_decode": True}, prompt_tokens=128)
        s.update_state_after_alloc(req, [], 0)
        s.build_connector_meta({"p1": 128}, idle=False)
        assert self._finish(s, req, "FINISHED_ABORTED") == (False, None)
        assert s.build_connector_meta({}, idle=True).discarded == {"p1"}
        s.assert_empty()

    def test_pool_full_degrades_to_no_handoff(self):
        s = _scheduler(blocks={"p1": list(range(10))})
        s.set_handshake(_handshake("P", pool_nbytes=4096))
        req = _request("p1", {"do_remote_decode": True}, prompt_tokens=128)
        s.update_state_after_alloc(req, [], 0)
        assert not s.build_connector_meta({"p1": 128}, idle=False).packs
        assert self._finish(s, req) == (False, None)
        assert s.take_stats().failures == {"pool_full": 1}
        s.assert_empty()


class TestSchedulerConsumer:
    def _decode(self):
        s = _scheduler(name="D", blocks={})
        s.set_handshake(_handshake("D"))
        return s

    def test_matched_tokens_and_recv_job(self):
        s = self._decode()
        params = _handoff().to_kv_transfer_params()
        req = _request("d1", params, prompt_tokens=300)
        assert s.get_num_new_matched_tokens(req, 0) == (300, True)
        assert s.get_num_new_matched_tokens(req, 64) == (236, True)  # side-effect free
        s.update_state_after_alloc(req, list(range(10)), 236)  # local hit: 2 blocks
        assert params["do_remote_prefill"] is False  # once only
        assert s.get_num_new_matched_tokens(req, 0) == (0, False)
        (job,) = s.build_connector_meta({}, idle=True).recvs
        assert job.first_block == 2 and job.offset is not None and job.block_ids == tuple(range(10))
        assert s.pool_bytes_in_use() == 4096  # all 3 slabs (250 B) needed
        s.update_connector_output(finished_sending=[], finished_recving=["d1"])
        s.assert_empty()

    def test_other_block_size_loads_token_span(self):
        s = self._decode()
        req = _request("d1", _handoff(block_size=16).to_kv_transfer_params(), prompt_tokens=300)
        assert s.get_num_new_matched_tokens(req, 64) == (236, True)
        s.update_state_after_alloc(req, list(range(10)), 236)
        (job,) = s.build_connector_meta({}, idle=True).recvs
        assert (job.first_token, job.end_token, job.first_block) == (64, 300, 4)  # sender blocks of 16
        s.update_connector_output(finished_sending=[], finished_recving=["d1"])
        s.assert_empty()

    def test_full_local_hit_only_releases(self):
        s = self._decode()
        req = _request("d1", _handoff().to_kv_transfer_params(), prompt_tokens=300)
        s.update_state_after_alloc(req, list(range(10)), 0)
        (job,) = s.build_connector_meta({}, idle=False).recvs
        assert job.offset is None and job.fail is None
        s.assert_empty()

    @pytest.mark.parametrize(
        "change", [{"head_dim": 32}, {"num_layers": 30}, {"dtype": "bfloat16"}, {"k_transposed": False}, {"slabs": []}]
    )
    def test_incompatible_or_empty_handoff_recomputes(self, change):
        s = self._decode()
        req = _request("d1", _handoff(**change).to_kv_transfer_params(), prompt_tokens=300)
        assert s.get_num_new_matched_tokens(req, 0) == (0, False)
        s.update_state_after_alloc(req, list(range(10)), 0)
        recvs = s.build_connector_meta({}, idle=False).recvs
        assert [(j.offset, j.fail) for j in recvs] == ([] if not change.get("slabs", True) else [(None, None)])
        s.assert_empty()


class TestPrefillLedger:
    def test_timeout_and_notification(self):
        clock = FakeClock(0.0)
        ledger = PrefillLedger(clock)
        for r in ("a", "b", "c"):
            ledger.on_packed(r)
        ledger.on_published("a", 5)
        ledger.on_published("b", 5)
        assert ledger.on_notified("c") is False  # early: before its publish
        ledger.on_published("c", 5)
        assert ledger.take_done({"a"}) == ({"a", "c"}, set())
        clock.t = 4.9
        assert ledger.take_done(set()) == (set(), set())
        clock.t = 5.0
        assert ledger.take_done(set()) == (set(), {"b"})
        assert not ledger.pending()

    def test_discarded_notification_is_forgotten(self):
        ledger = PrefillLedger(FakeClock(0.0))
        ledger.on_packed("a")
        ledger.on_notified("a")
        ledger.on_discarded("a")
        assert ledger.take_done(set()) == (set(), set()) and not ledger.packed


def _caches(num_blocks=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {
        f"model.layers.{i}.self_attn.attn": torch.randn(num_blocks, 3, BS, 128, generator=g)
        for i in range(GEOM["num_layers"])
    }


def _resident_share(t: torch.Tensor) -> float:
    """Share of ``t``'s pages in RAM (mincore(2))."""
    import ctypes
    import os

    libc = ctypes.CDLL(None, use_errno=True)
    page = os.sysconf("SC_PAGE_SIZE")
    start = t.data_ptr() - t.data_ptr() % page
    length = t.data_ptr() + t.numel() * t.element_size() - start
    vec = (ctypes.c_ubyte * ((length + page - 1) // page))()
    assert libc.mincore(ctypes.c_void_p(start), ctypes.c_size_t(length), vec) == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec) / len(vec)


def test_slab_pool_is_resident_when_prefaulted():
    """``prefault_pool`` (default on) touches every pool page at start, so no handoff pays page faults
    (loadtests/kv/kv_xfer_microbench.py: READs into fresh pages ran ~4x slower): every page is in RAM."""
    assert SlabConnectorSettings().prefault_pool
    w = SlabConnectorWorker(
        SlabConnectorSettings(pool_mib=96),
        "P",
        lambda: FakeTransport("P", {}),
        clock=FakeClock(0.0),
        wall_clock=lambda: 0.0,
    )
    w.register_kv_caches(_caches())
    assert _resident_share(w.pool) == 1.0


def _thp_mode() -> str:
    """The kernel's THP mode, which decides what the huge-page tests below can expect."""
    from kvtransfer.hostmem import thp_mode

    mode = thp_mode()
    assert mode in ("always", "madvise", "never"), f"THP mode {mode!r}: the huge-page tests need Linux THP"
    return mode


def test_slab_pool_sits_on_huge_pages():
    """``huge_pages`` (default on) asks for transparent huge pages: same-host READs (UCX cma) copy
    ~2x faster from them (loadtests/kv/kv_xfer_microbench.py). With THP ``never`` in the kernel the pool
    is ordinary memory and still works."""
    from kvtransfer.hostmem import HUGE_PAGE, huge_page_bytes

    mode = _thp_mode()
    assert SlabConnectorSettings().huge_pages
    w = SlabConnectorWorker(
        SlabConnectorSettings(pool_mib=64),
        "P",
        lambda: FakeTransport("P", {}),
        clock=FakeClock(0.0),
        wall_clock=lambda: 0.0,
    )
    w.register_kv_caches(_caches())
    assert w.pool.numel() == 64 << 20 and w.pool.data_ptr() % HUGE_PAGE == 0
    huge = huge_page_bytes(w.pool)
    if mode == "never":
        assert huge == 0
    else:
        assert huge >= (64 << 20) * 3 // 4, f"only {huge >> 20} MiB of the pool on huge pages"
    plain = SlabConnectorWorker(
        SlabConnectorSettings(pool_mib=64, huge_pages=False),
        "Q",
        lambda: FakeTransport("Q", {}),
        clock=FakeClock(0.0),
        wall_clock=lambda: 0.0,
    )
    plain.register_kv_caches(_caches())
    assert _resident_share(plain.pool) == 1.0
    # a pool that does not ask gets no huge pages, except under "always", where the kernel gives them unasked
    assert mode == "always" or huge_page_bytes(plain.pool) == 0


def test_an_existing_tensor_moves_onto_huge_pages():
    """kvtransfer/hostmem.py: a tensor allocated and written before anyone asked (vLLM's KV cache)
    moves onto huge pages with its contents kept (what QuietNixlConnector does before registering)."""
    import platform

    from kvtransfer.hostmem import collapse_to_huge_pages, huge_page_bytes

    t = torch.arange(16 << 20, dtype=torch.int32)  # 64 MiB, written
    before = t.clone()
    moved = collapse_to_huge_pages(t)
    assert torch.equal(t, before)
    kernel = tuple(int(x) for x in platform.release().split(".")[:2] if x.isdigit())
    if kernel < (6, 1):  # no MADV_COLLAPSE: refused, nothing moved
        assert not moved
    else:
        assert _thp_mode() in ("always", "madvise"), "MADV_COLLAPSE needs THP enabled in the kernel"
        assert moved and huge_page_bytes(t) >= (64 << 20) * 3 // 4


def test_transport_asks_ucx_for_a_mutex():
    """``ucx_mt_mutex`` (default on): the real NIXL agent's UCX workers lock with a mutex, so its
    progress thread sleeps instead of spinning against the engine's READ; off means UCX's spinlock.
    Read from UCX's own debug log ("listening to async event ... mode thread_mutex"), one fresh
    process per setting: UCX reads its log level once per process."""
    from kvtransfer.config import UCX_MT_MUTEX_ENV

    assert SlabConnectorSettings().ucx_mt_mutex
    script = (
        "import sys; from kvtransfer.nixl_transport import NixlTransport; "
        "t = NixlTransport('mutex', '127.0.0.1', mt_mutex=sys.argv[1] == 'on'); "
        "assert t.listen_address()[1] > 0; t.close()"
    )
    env = {k: v for k, v in os.environ.items() if k != UCX_MT_MUTEX_ENV} | {"UCX_LOG_LEVEL": "debug"}
    modes = {}
    for flag in ("on", "off"):
        run = subprocess.run(
            [sys.executable, "-c", script, flag], cwd=REPO, env=env, capture_output=True, text=True, timeout=120
        )
        assert run.returncode == 0, run.stderr[-3000:]
        modes[flag] = set(re.findall(r"listening to async event .* mode (thread_\w+)", run.stdout))
    assert "thread_mutex" in modes["on"], modes
    assert modes["off"] == {"thread_spinlock"}, modes


class TestWorkerRoundTrip:
    """Prefill worker packs, decode worker READs over FakeTransport and scatters; ranges and
    handles all come back."""

    def _pair(self, reachable=True, fail_reads=False, **settings):
        registry, clock = {}, FakeClock(0.0)
        cfg = SlabConnectorSettings(pool_mib=8, **settings)
        p = SlabConnectorWorker(cfg, "P", lambda: FakeTransport("P", registry), clock=clock, wall_clock=lambda: 0.0)
        d = SlabConnectorWorker(
            cfg, "D", lambda: FakeTransport("D", registry, reachable, fail_reads), clock=clock, wall_clock=lambda: 0.0
        )
        p.register_kv_caches(_caches(seed=1))
        d.register_kv_caches({k: torch.zeros_like(v) for k, v in _caches().items()})
        ps = SlabConnectorScheduler(
            cfg, "P", p.spec, torch.float32, block_ids_of=lambda rid: [9, 3, 5, 12, 0, 7], clock=lambda: 0.0
        )
        ds = SlabConnectorScheduler(cfg, "D", d.spec, torch.float32, block_ids_of=lambda rid: [], clock=lambda: 0.0)
        ps.set_handshake(p.handshake)
        ds.set_handshake(d.handshake)
        return p, d, ps, ds, clock

    def _prefill(self, p, ps, compression="none"):
        req = _request("p1", {"do_remote_decode": True, "compression": compression}, prompt_tokens=170)
        ps.update_state_after_alloc(req, [], 0)
        p.wait_for_save(ps.build_connector_meta({"p1": 170}, idle=False))
        req.status = SimpleNamespace(name="FINISHED_LENGTH_CAPPED")
        delay, params = ps.request_finished(req, [9])
        assert delay
        p.start_load_kv(ps.build_connector_meta({}, idle=True))
        return params

    def _decode_step(self, d, ds, req=None, blocks=(1, 2, 4, 6, 8, 10), external=170):
        if req is not None:
            ds.update_state_after_alloc(req, list(blocks), external)
        d.start_load_kv(ds.build_connector_meta({}, idle=True))
        sending, recving, failed = d.get_transfer_results()
        ds.update_connector_output(sending, recving)
        return recving, failed

    @pytest.mark.parametrize("compression", ["none", "int8", "int4"])
    def test_handoff(self, compression):
        p, d, ps, ds, _ = self._pair()
        params = self._prefill(p, ps, compression)
        req = _request("d1", params, prompt_tokens=170)
        assert ds.get_num_new_matched_tokens(req, 0) == (170, True)
        recving, failed = self._decode_step(d, ds, req)
        assert recving == {"d1"} and not failed
        assert d.transport.reads == [2]  # ONE descriptor per slab (6 blocks)
        for src, dst in zip(p.layers, d.layers):
            got, want = dst[[1, 2, 4, 6, 8, 10]], src[[9, 3, 5, 12, 0, 7]]
            if compression == "none":
                assert torch.equal(got, want)
            else:
                tol = 0.03 if compression == "int8" else 0.5
                assert (got - want).abs().max() < tol * want.abs().max()
        sending, _, _ = p.get_transfer_results()  # the read's notification
        assert sending == {"p1"}
        ps.update_connector_output(sending, [])
        ps.assert_empty()
        ds.assert_empty()
        st = d.take_stats()
        assert st.num_handoffs_received == 1 and st.num_descriptors == 2
        assert (st.wire_bytes == st.raw_bytes) == (compression == "none")

    def test_a_read_done_at_post_completes_in_the_same_call(self):
        """A same-host READ (UCX cma) is done when its post returns: the receive completes inside the
        start_load_kv that started it, so an idle step does not sleep idle_wait_ms before reporting it."""
        p, d, ps, ds, _ = self._pair()
        req = _request("d1", self._prefill(p, ps), prompt_tokens=170)
        ds.get_num_new_matched_tokens(req, 0)
        ds.update_state_after_alloc(req, [1, 2, 4, 6, 8, 10], 170)
        d.start_load_kv(ds.build_connector_meta({}, idle=True))
        assert d.transport.reads == [2] and not d._receives and d._finished.received == {"d1"}

    @pytest.mark.parametrize("compression", ["none", "int4"])
    def test_handoff_to_a_larger_block_size(self, compression):
        """A block-32 prefill (6 blocks, 170 tokens) to a block-64 decode with its first 64 tokens
        already cached: tokens 64..169 land token by token in the decode's own block table."""
        registry, clock = {}, FakeClock(0.0)
        cfg = SlabConnectorSettings(pool_mib=8)
        p = SlabConnectorWorker(cfg, "P", lambda: FakeTransport("P", registry), clock=clock, wall_clock=lambda: 0.0)
        d = SlabConnectorWorker(cfg, "D", lambda: FakeTransport("D", registry), clock=clock, wall_clock=lambda: 0.0)
        p.register_kv_caches(_caches(seed=1))
        g = torch.Generator().manual_seed(2)
        d.register_kv_caches(
            {
                f"model.layers.{i}.self_attn.attn": torch.randn(8, 3, 64, 128, generator=g)
                for i in range(GEOM["num_layers"])
            }
        )
        before = [t.clone() for t in d.layers]
        ps = SlabConnectorScheduler(
            cfg, "P", p.spec, torch.float32, block_ids_of=lambda rid: [9, 3, 5, 12, 0, 7], clock=lambda: 0.0
        )
        ds = SlabConnectorScheduler(cfg, "D", d.spec, torch.float32, block_ids_of=lambda rid: [], clock=lambda: 0.0)
        ps.set_handshake(p.handshake)
        ds.set_handshake(d.handshake)
        params = self._prefill(p, ps, compression)
        req = _request("d1", params, prompt_tokens=170)
        assert ds.get_num_new_matched_tokens(req, 64) == (106, True)
        recving, failed = self._decode_step(d, ds, req, blocks=(5, 2, 6), external=106)
        assert recving == {"d1"} and not failed
        # token t of the request: sender block [9,3,5,12,0,7][t // 32] row t % 32; receiver [5,2,6][t // 64]
        tok = torch.arange(64, 170)
        src_blk, src_off = torch.tensor([9, 3, 5, 12, 0, 7])[tok // 32], tok % 32
        dst_blk, dst_off = torch.tensor([5, 2, 6])[tok // 64], tok % 64
        for src, dst, old in zip(p.layers, d.layers, before):
            # CPU layout [blocks, heads, block_size, 2*head_dim] with K stored transposed per block/head:
            # compare through the codec's token-major view instead of raw rows
            src_tm = p._codecs["none"].to_token_major(p._codecs["none"].gather([src], list(range(16))))[0]
            dst_tm = d._codecs["none"].to_token_major(d._codecs["none"].gather([dst], list(range(8))))[0]
            want, got = src_tm[src_blk, :, :, src_off], dst_tm[dst_blk, :, :, dst_off]  # [T, H, 2, D]
            if compression == "none":
                assert torch.equal(got, want)
            else:
                assert (got - want).abs().max() < 0.5 * want.abs().max()
            old_tm = d._codecs["none"].to_token_major(d._codecs["none"].gather([old], list(range(8))))[0]
            assert torch.equal(dst_tm[5, :, :, :64], old_tm[5, :, :, :64])  # the cached prefix: untouched
            assert torch.equal(dst_tm[6, :, :, 42:], old_tm[6, :, :, 42:])  # past the prompt: untouched
        st = d.take_stats()
        assert st.num_handoffs_received == 1 and (st.raw_bytes == st.wire_bytes) == (compression == "none")

    def test_unreachable_prefill_fails_the_read_after_connect_timeout(self):
        p, d, ps, ds, clock = self._pair(reachable=False, connect_timeout_s=2)
        req = _request("d1", self._prefill(p, ps), prompt_tokens=170)
        assert self._decode_step(d, ds, req) == (set(), set())
        clock.t = 2.5
        assert self._decode_step(d, ds) == ({"d1"}, {"d1"})
        assert d.take_stats().failures == {"connect_timeout": 1}
        ds.assert_empty()

    def test_failed_read_notifies_prefill_which_frees(self):
        p, d, ps, ds, _ = self._pair(fail_reads=True)
        req = _request("d1", self._prefill(p, ps), prompt_tokens=170)
        assert self._decode_step(d, ds, req) == ({"d1"}, {"d1"})
        sending, _, _ = p.get_transfer_results()
        assert sending == {"p1"}

    def test_decode_never_reads_prefill_frees_after_timeout(self):
        p, _, ps, _, clock = self._pair(handoff_timeout_s=3)
        self._prefill(p, ps)
        assert p.get_transfer_results()[0] == set()
        clock.t = 3.0
        sending, _, _ = p.get_transfer_results()
        assert sending == {"p1"}
        ps.update_connector_output(sending, [])
        ps.assert_empty()
        assert p.take_stats().num_released_by_timeout == 1

    def test_expired_handoff_is_not_read(self):
        p, d, ps, ds, _ = self._pair(handoff_timeout_s=3)
        req = _request("d1", self._prefill(p, ps), prompt_tokens=170)
        d._wall = lambda: 2.5  # within expiry_margin_s of the deadline
        assert self._decode_step(d, ds, req) == ({"d1"}, {"d1"})
        assert d.transport.reads == []


class TestStats:
    def test_aggregate_reduce(self):
        a = KVTransferStats(
            num_handoffs_received=2, num_descriptors=6, wire_bytes=100, raw_bytes=400, handoff_s=[0.01, 0.03]
        )
        a.fail("read_timeout")
        b = KVTransferStats(num_handoffs_received=1, num_descriptors=3, wire_bytes=50, raw_bytes=200, handoff_s=[0.02])
        b.fail("read_timeout")
        b.fail("expired")
        r = a.aggregate(b).reduce()
        assert r["descriptors_per_handoff"] == 3 and r["wire_to_raw"] == 0.25
        assert r["handoff_p50_s"] == 0.02 and r["failures_read_timeout"] == 2 and r["failures_expired"] == 1
        assert KVTransferStats.from_dict(a.to_dict()) == a
        assert a.latency_histogram()[-1] == 3 and KVTransferStats().is_empty()


class TestWorkersWiring:
    def test_slab_backend_config_and_handoff(self):
        from workers.config import KvHandoffConfig
        from workers.handoff import make_handoff

        backend = make_handoff(KvHandoffConfig(backend="slab", slab={"compression": "int4"}), "127.0.0.1")
        ktc = backend.kv_transfer_config()
        assert ktc["kv_connector"] == "SlabKVConnector" and ktc["kv_connector_module_path"] == "kvtransfer.connector"
        assert ktc["kv_load_failure_policy"] == "recompute"
        settings = SlabConnectorSettings.from_extra_config(ktc["kv_connector_extra_config"])
        # the agent's name and port are fixed here, so the replica can advertise them (push mode)
        name, host, port = backend.kv_agent()
        assert settings.compression == "int4" and settings.side_channel_port == port > 0
        assert ktc["engine_id"] == name and host == "127.0.0.1"
        assert backend.prefill_params()["do_remote_decode"] is True
        handoff = backend.handoff_from_output(_handoff().to_kv_transfer_params())
        assert (handoff.num_blocks, handoff.num_tokens, handoff.remote_engine_id) == (10, 300, "P")
        assert handoff.to_kv_transfer_params() == _handoff().to_kv_transfer_params()
        assert backend.handoff_from_output({"do_remote_prefill": False}) is None

    def test_slab_settings_reach_the_connector_unchanged(self):
        """``kv_handoff.slab`` goes into the extra config as it is; the fields both backends share come
        from ``kv_handoff`` (mapped in workers/handoff.py only)."""
        from kvtransfer.config import SlabSettings
        from workers.config import KvHandoffConfig
        from workers.handoff import make_handoff

        slab = SlabSettings(compression="int8", slab_tokens=64, read_timeout_s=3, pool_mib=128, idle_wait_ms=0)
        cfg = KvHandoffConfig(
            backend="slab", slab=slab, kv_lease_s=12, ucx_tls="tcp", nixl_progress_delay_us=0, ucx_mt_mutex=False
        )
        backend = make_handoff(cfg, "0.0.0.0")
        extra = backend.kv_transfer_config()["kv_connector_extra_config"]
        assert {k: extra[k] for k in SlabSettings.model_fields} == slab.model_dump()
        _, host, port = backend.kv_agent()
        assert {k: v for k, v in extra.items() if k not in SlabSettings.model_fields} == {
            "handoff_timeout_s": 12.0,
            "ucx_tls": "tcp",
            "progress_delay_us": 0,
            "ucx_mt_mutex": False,
            "side_channel_host": host,
            "side_channel_port": port,
        }
        assert host == "127.0.0.1"
        # kv_handoff's defaults are the connector's own (but ucx_tls: a cluster always names its transports)
        ktc = make_handoff(KvHandoffConfig(backend="slab"), "127.0.0.1").kv_transfer_config()
        default = SlabConnectorSettings.from_extra_config(ktc["kv_connector_extra_config"])
        assert default.model_dump(exclude={"side_channel_port", "ucx_tls"}) == SlabConnectorSettings(
            side_channel_port=1
        ).model_dump(exclude={"side_channel_port", "ucx_tls"})

    def test_push_decode_handoff_is_the_connectors_push(self):
        """serve/ builds push-mode decode handoffs with workers/kv_params; the connector parses them."""
        from kvtransfer.wire import SlabPush, decode_push_params
        from workers.kv_params import push_decode_handoff

        handoff = push_decode_handoff(("P", "10.0.0.1", 7000), "rv", 300, "int4", timeout_s=48.0)
        want = decode_push_params(SlabPush("rv", "P", "10.0.0.1", 7000, "int4", 48.0))
        assert handoff.to_kv_transfer_params() == want
        assert SlabPush.from_kv_transfer_params(want) == SlabPush("rv", "P", "10.0.0.1", 7000, "int4", 48.0)
        assert (handoff.remote_engine_id, handoff.remote_request_id, handoff.num_tokens) == ("P", "rv", 300)


class TestPushMode:
    """Push: the decode reserves a range for the whole prompt and sends it to the prefill's agent, which
    WRITEs its packed slabs there and notifies; fakes for the transport only."""

    def _pair(self, **settings):
        pair = TestWorkerRoundTrip()._pair(**settings)
        p, d, ps, ds, clock = pair
        return p, d, ps, ds, clock

    @staticmethod
    def _awaiting_pack(p):
        """Rendezvous ids whose decode reservation waits for a prefill that has not packed."""
        return {r for r, s in p._pusher.pushes.items() if s.state is PushState.AWAITING_PACK}

    def _prefill_req(self, compression="none", prompt_tokens=170):
        from kvtransfer.wire import prefill_push_params

        return _request("p1", prefill_push_params("rv1", compression), prompt_tokens=prompt_tokens)

    def _decode_req(self, compression="none", prompt_tokens=170):
        from kvtransfer.wire import SlabPush, decode_push_params

        return _request(
            "d1", decode_push_params(SlabPush("rv1", "P", "127.0.0.1", 1, compression)), prompt_tokens=prompt_tokens
        )

    def _pack(self, p, ps, req):
        ps.update_state_after_alloc(req, [], 0)
        p.wait_for_save(ps.build_connector_meta({"p1": req.num_prompt_tokens}, idle=False))
        req.status = SimpleNamespace(name="FINISHED_LENGTH_CAPPED")
        assert ps.request_finished(req, [9])[0]
        p.start_load_kv(ps.build_connector_meta({}, idle=True))

    def _step(self, w, sched):
        w.start_load_kv(sched.build_connector_meta({}, idle=True))
        sending, recving, failed = w.get_transfer_results()
        sched.update_connector_output(sending, recving)
        return sending, recving, failed

    @pytest.mark.parametrize("compression", ["none", "int4"])
    @pytest.mark.parametrize("decode_first", [True, False])
    def test_push_round_trip(self, compression, decode_first):
        p, d, ps, ds, _ = self._pair()
        dreq = self._decode_req(compression)
        assert ds.get_num_new_matched_tokens(dreq, 0) == (170, True)
        if not decode_first:
            self._pack(p, ps, self._prefill_req(compression))
        ds.update_state_after_alloc(dreq, [1, 2, 4, 6, 8, 10], 170)
        assert self._step(d, ds) == (set(), set(), set())  # reservation sent, nothing landed yet
        if decode_first:
            self._pack(p, ps, self._prefill_req(compression))
        sending, _, _ = self._step(p, ps)  # reservation in -> WRITE -> done
        assert sending == {"p1"} and p.transport.writes == [2] and d.transport.reads == []
        assert self._step(d, ds) == (set(), {"d1"}, set())
        for src, dst in zip(p.layers, d.layers):
            got, want = dst[[1, 2, 4, 6, 8, 10]], src[[9, 3, 5, 12, 0, 7]]
            if compression == "none":
                assert torch.equal(got, want)
            else:
                assert (got - want).abs().max() < 0.5 * want.abs().max()
        ps.assert_empty()
        ds.assert_empty()
        st = d.take_stats()  # counted once, by the receiver
        assert (st.num_handoffs_received, st.num_descriptors) == (1, 2) and p.take_stats().num_descriptors == 0

    def test_mismatched_prompt_fails_fast_and_frees_both(self):
        p, d, ps, ds, _ = self._pair()
        dreq = self._decode_req(prompt_tokens=200)  # the decode saw another prompt
        ds.update_state_after_alloc(dreq, [1, 2, 4, 6, 8, 10, 11], 200)
        self._step(d, ds)
        self._pack(p, ps, self._prefill_req())
        sending, _, _ = self._step(p, ps)
        assert sending == {"p1"} and p.transport.writes == []  # never written
        assert self._step(d, ds) == (set(), {"d1"}, {"d1"})  # pushfail: recompute now
        ps.assert_empty()
        ds.assert_empty()
        assert p.take_stats().failures == {"push_mismatch": 1}

    def test_full_local_hit_lets_the_prefill_go(self):
        p, d, ps, ds, _ = self._pair()
        ds.update_state_after_alloc(self._decode_req(), [1, 2, 4, 6, 8, 10], 0)
        assert self._step(d, ds) == (set(), set(), set())
        self._pack(p, ps, self._prefill_req())
        sending, _, _ = self._step(p, ps)
        assert sending == {"p1"} and p.transport.writes == []
        ps.assert_empty()
        ds.assert_empty()

    def test_prefill_never_comes_decode_gives_up_only_after_the_write_window(self):
        p, d, ps, ds, _ = self._pair(read_timeout_s=5, expiry_margin_s=1)
        ds.update_state_after_alloc(self._decode_req(), [1, 2, 4, 6, 8, 10], 170)
        self._step(d, ds)
        d._wall = lambda: 5.5  # past the deadline, within the margin a write may still land
        assert self._step(d, ds) == (set(), set(), set())
        d._wall = lambda: 6.5
        assert self._step(d, ds) == (set(), {"d1"}, {"d1"})
        ds.assert_empty()
        # the prefill holds an unanswered reservation only until deadline + margin
        p.transport.inbox = list(p.transport.inbox)
        assert self._step(p, ps)[0] == set() and self._awaiting_pack(p) == {"rv1"}
        p._wall = lambda: 6.5
        self._step(p, ps)
        assert self._awaiting_pack(p) == set() and p._pusher.pushes == {}

    def test_a_long_prefill_is_waited_for_as_long_as_the_push_asks(self):
        """A reservation naming ``timeout_s`` (the router: a few predicted TTFTs) outlives read_timeout_s:
        a 4k-token prompt prefills for ~16 s on one CPU core; the write still lands at 12 s."""
        from kvtransfer.wire import SlabPush, decode_push_params

        p, d, ps, ds, _ = self._pair(read_timeout_s=5, expiry_margin_s=1)
        dreq = _request("d1", decode_push_params(SlabPush("rv1", "P", "127.0.0.1", 1, "none", 30.0)), prompt_tokens=170)
        ds.update_state_after_alloc(dreq, [1, 2, 4, 6, 8, 10], 170)
        self._step(d, ds)
        d._wall = p._wall = lambda: 12.0  # past read_timeout_s, within the push's 30 s
        assert self._step(d, ds) == (set(), set(), set())
        self._pack(p, ps, self._prefill_req())
        sending, _, _ = self._step(p, ps)
        assert sending == {"p1"} and p.transport.writes == [2]
        assert self._step(d, ds) == (set(), {"d1"}, set())
        ps.assert_empty()
        ds.assert_empty()

    def test_prefill_too_close_to_the_deadline_does_not_write(self):
        p, d, ps, ds, _ = self._pair(read_timeout_s=5, expiry_margin_s=1)
        ds.update_state_after_alloc(self._decode_req(), [1, 2, 4, 6, 8, 10], 170)
        self._step(d, ds)
        p._wall = lambda: 4.5  # the reservation's deadline is 5: too late to start a write
        self._pack(p, ps, self._prefill_req())
        sending, _, _ = self._step(p, ps)
        assert sending == {"p1"} and p.transport.writes == []
        assert p.take_stats().failures == {"push_expired": 1}
        assert self._step(d, ds) == (set(), {"d1"}, {"d1"})  # told at once: recompute
        ps.assert_empty()
        ds.assert_empty()
