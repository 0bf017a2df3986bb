"""SlabConnectorWorker: the slab connector in vLLM's worker process (owns the pool, the transport,
the paged caches). It executes the scheduler side's jobs; it decides nothing about pool ranges.

Per engine step (vLLM's order): ``start_load_kv`` (apply published/discarded, queue and advance
reads) -> ``wait_for_save`` (pack this step's completed prompts; on an idle step with handoffs
pending, sleep ``idle_wait_ms`` instead of letting the engine spin) -> ``get_transfer_results``
(notifications, timeouts, finished reads).

Pool (registered with NIXL once, at ``register_kv_caches``)::

    pool: [ range A (prefill req 1): slab0 | slab1 | ... ][ free ][ range B (decode req 7): slab0 .. ]
    slab (none) = [layer 0 blocks][layer 1 blocks]...  (see kvtransfer/codec.py for a block's interior)

Push mode (PackJob.push / RecvJob.push): the decode sends its reservation (a SlabHandoff of its own
range) to the prefill's agent; the prefill WRITEs its packed slabs there with a "pushed" notification
and counts the write's completion as the read-done (that side: kvtransfer/push_sender.py). Safety of
the decode's range: the prefill never starts a write after ``reservation.deadline - expiry_margin_s``;
the decode gives up (and its range is freed) only at ``deadline + expiry_margin_s`` or on the
prefill's "pushfail", so no late write can land in a reused range. A push's ``transfer_s`` and
``handoff_s`` span reservation -> data landed, so they include the prefill's own compute (the decode
waited that long for its KV).

Lifecycles (who frees what; the state objects are in kvtransfer/transfers.py and kvtransfer/ledger.py):
  prefill  packed -> published(timeout) -> notified | timed out -> finished_sending (scheduler frees
           the range, vLLM the blocks). A notification may arrive before "published" (kept until it).
  decode   queued -> connecting (connect_timeout_s) -> reading (read_timeout_s) -> scattered
           -> finished_recving; any failure -> finished_recving + failed_recving (vLLM recomputes)
           and, if the peer is reachable, a release notification so the prefill frees early.

Pull-mode failure policy (decode side; every failure is recomputed by vLLM, counted in stats.failures):
  the scheduler already failed the job     -> failed now; release notification if the peer is connected
  handoff within expiry_margin_s of its     -> "expired", never read; release notification if connected
  deadline at start
  peer metadata not loaded in time          -> "connect_timeout"; no notification (peer unreachable); the
                                               transport may fetch that peer again later
  READ fails to start or ends FAILED        -> "read_error"; handle released; release notification
  READ still pending after read_timeout_s   -> "read_timeout"; handle released; release notification
  decoding/scattering the slabs raises      -> "decode_error"; no notification (the READ's own did)
  nothing to load (full local prefix hit)   -> release notification once the peer is connected; given up
                                               after connect_timeout_s
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from collections.abc import Callable, Mapping

import msgspec
import torch

from kvtransfer.codec import SlabCodec
from kvtransfer.config import SlabConnectorSettings
from kvtransfer.hostmem import alloc_host, huge_page_bytes
from kvtransfer.ledger import PrefillLedger
from kvtransfer.metadata import RecvJob, SlabConnectorMetadata, SlabHandshake
from kvtransfer.push_sender import PushSender
from kvtransfer.slab import SlabSpec, pool_nbytes
from kvtransfer.stats import KVTransferStats
from kvtransfer.transfers import Finished, Receive, ReceiveState, Release
from kvtransfer.transport import TransferState, Transport
from kvtransfer.unpack import SlabUnpacker
from kvtransfer.wire import COMPRESSIONS, NOTE_PUSH_FAILED, NOTE_PUSHED, NOTE_RESERVE, SlabHandoff

logger = logging.getLogger(__name__)

MiB = 1 << 20


def _layer_key(name: str) -> tuple:
    return tuple(int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name))


class SlabConnectorWorker:
    def __init__(
        self,
        settings: SlabConnectorSettings,
        engine_id: str,
        make_transport: Callable[[], Transport],
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ):
        self.settings, self.engine_id = settings, engine_id
        self._make_transport = make_transport
        self._clock, self._wall = clock, wall_clock
        self.transport: Transport | None = None
        self.layers: list[torch.Tensor] = []
        self.pool: torch.Tensor | None = None
        self.spec: SlabSpec | None = None
        self._codecs: dict[str, SlabCodec] = {}
        self._unpacker: SlabUnpacker | None = None
        self.ledger = PrefillLedger(clock)  # prefill: handoffs awaiting their read-done
        self._receives: dict[str, Receive] = {}  # decode: request id -> its KV on the way in
        self._releases: list[Release] = []  # decode: prefills to tell they can let go
        # the worker's clocks and its current stats, looked up at each call
        self._pusher = PushSender(
            settings, lambda: self._clock(), lambda: self._wall(), lambda reason: self.stats.fail(reason)
        )
        self._finished = Finished()  # decode: reported by the next get_transfer_results
        self.stats = KVTransferStats()
        self.handshake: SlabHandshake | None = None

    # ----------------------------------------------------------------------------- start-up
    def register_kv_caches(self, kv_caches: Mapping[str, torch.Tensor]) -> None:
        """Once, after vLLM allocated the paged caches: build the codecs, the pool and the agent."""
        self.layers = [kv_caches[k] for k in sorted(kv_caches, key=_layer_key)]
        first = self.layers[0]
        if first.dim() != 4 or any(t.shape != first.shape or t.dtype != first.dtype for t in self.layers):
            raise ValueError(f"expected per-layer [blocks, heads, block_size, 2*head_dim] caches, got {first.shape}")
        if not all(t.is_contiguous() for t in self.layers):
            raise ValueError("slab connector needs contiguous per-layer caches (LBHNC)")
        _, heads, block_size, content = first.shape
        self.spec = SlabSpec(
            num_layers=len(self.layers),
            num_kv_heads=heads,
            head_dim=content // 2,
            block_size=block_size,
            dtype_bytes=first.element_size(),
            min_slab_tokens=self.settings.slab_tokens,
        )
        self._codecs = {c: SlabCodec(self.spec, first.dtype, c, self.settings.group) for c in COMPRESSIONS}
        nbytes = (
            self.settings.pool_mib * MiB
            if self.settings.pool_mib
            else pool_nbytes(self.spec, self.settings.pool_tokens)
        )
        # pre-faulted: a READ or pack into fresh pages pays a page fault per page, ~4x slower on this
        # VM; on huge pages a same-host READ copies ~2x faster (loadtests/kv/kv_xfer_microbench.py). RDMA
        # registration pins the pages anyway
        self.pool = alloc_host(nbytes, huge_pages=self.settings.huge_pages, prefault=self.settings.prefault_pool)
        self._unpacker = SlabUnpacker(self.spec, self.layers, self.pool, self._codecs, self.settings.group)
        self.transport = self._pusher.transport = self._make_transport()
        self.transport.register_pool(self.pool)
        self._pusher.layout = (
            block_size,
            self.spec.num_layers,
            heads,
            self.spec.head_dim,
            str(first.dtype).removeprefix("torch."),
            True,
            self.settings.group,
        )
        host, port = self.transport.listen_address()
        self.handshake = SlabHandshake(self.transport.name, host, port, self.pool.data_ptr(), nbytes)
        logger.info(
            "slab connector: %d layers x %s, block %d, slab %d blocks, pool %d MiB (%d MiB on huge pages)",
            len(self.layers),
            tuple(first.shape[1:]),
            block_size,
            self.spec.blocks_per_slab,
            nbytes >> 20,
            huge_page_bytes(self.pool) >> 20,
        )

    # ----------------------------------------------------------------------------- per step
    def start_load_kv(self, meta: SlabConnectorMetadata) -> None:
        for req_id in meta.discarded:
            self.ledger.on_discarded(req_id)
        for req_id, timeout_s in meta.published.items():
            self.ledger.on_published(req_id, timeout_s)
        now = self._clock()
        for job in meta.recvs:
            self._start_receive(job, now)
        self._advance_receives()

    def wait_for_save(self, meta: SlabConnectorMetadata) -> None:
        for job in meta.packs:
            t0 = time.perf_counter()
            codec = self._codecs[job.compression]
            pos, first = job.offset, 0
            local = []
            for num_blocks, nbytes in zip(job.slab_blocks, job.slab_nbytes):
                codec.pack(self.layers, job.block_ids[first : first + num_blocks], self.pool[pos : pos + nbytes])
                local.append((self.pool.data_ptr() + pos, nbytes))
                pos, first = pos + nbytes, first + num_blocks
            self.ledger.on_packed(job.request_id)
            if job.push is not None:
                self._pusher.on_packed(job, local)
            self.stats.num_handoffs_sent += 1
            self.stats.num_slabs += len(job.slab_blocks)
            self.stats.pack_s.append(time.perf_counter() - t0)
        self._pusher.advance()
        if meta.idle and self._busy() and self.settings.idle_wait_ms > 0:
            time.sleep(self.settings.idle_wait_ms / 1000)

    def _busy(self) -> bool:
        """Anything for NIXL to progress."""
        return bool(self.ledger.pending() or self._receives or self._releases or self._pusher.busy())

    def get_transfer_results(self) -> tuple[set[str], set[str], set[str]]:
        """(finished_sending, finished_recving, failed_recving) since the last call."""
        notified = self._drain_notifications()
        self._pusher.advance()
        notified |= self._pusher.take_pushed()
        for req_id in notified:
            self.ledger.on_notified(req_id)
        by_notif, by_timeout = self.ledger.take_done(notified)
        self._pusher.forget(by_timeout)
        self.stats.num_released_by_notification += len(by_notif)
        self.stats.num_released_by_timeout += len(by_timeout)
        for _ in by_timeout:
            self.stats.fail("handoff_timeout")
        if by_timeout:
            logger.warning(
                "freeing %d handoffs no decode confirmed within %.1f s",
                len(by_timeout),
                self.settings.handoff_timeout_s,
            )
        self._advance_receives()
        self._advance_releases()
        received, failed = self._finished.received, self._finished.failed
        self._finished.received, self._finished.failed = set(), set()
        return by_notif | by_timeout, received, failed

    def _drain_notifications(self) -> set[str]:
        """Route this agent's notifications; returns the read-done request ids (pull)."""
        read_done = set()
        for _, m in self.transport.drain_notifications() if self.transport else ():
            if m.startswith(NOTE_RESERVE):
                try:
                    res = msgspec.json.decode(m[len(NOTE_RESERVE) :], type=SlabHandoff)
                except msgspec.ValidationError:
                    logger.warning("malformed push reservation ignored")
                    continue
                self._pusher.on_reservation(res)
            elif m.startswith(NOTE_PUSHED) or m.startswith(NOTE_PUSH_FAILED):
                kind, _, rendezvous = m.partition(b" ")
                r = next(
                    (r for r in self._receives.values() if r.is_push and r.job.push.rendezvous == rendezvous.decode()),
                    None,
                )
                if r is not None:  # else: a receive we already gave up
                    r.note = kind + b" "
            else:
                read_done.add(m.decode())
        return read_done

    # ----------------------------------------------------------------------------- decode
    def _start_receive(self, job: RecvJob, now: float) -> None:
        h = job.handoff
        if job.push is not None:
            self._start_push_receive(job, now)
            return
        if job.offset is None and job.fail is None:
            self.transport.connect(h.engine_id, h.host, h.port)
            self._releases.append(Release(job, now + self.settings.connect_timeout_s))
            return
        if job.fail is not None:
            self._fail(job.request_id, job.fail, h)
            return
        if self._wall() > h.deadline_unix_s - self.settings.expiry_margin_s:
            self._fail(job.request_id, "expired", h)
            return
        self.transport.connect(h.engine_id, h.host, h.port)
        self._receives[job.request_id] = Receive(job, now + self.settings.connect_timeout_s, now)

    def _start_push_receive(self, job: RecvJob, now: float) -> None:
        """Push mode: connect to the prefill's agent; the reservation goes out once connected."""
        push = job.push
        self.transport.connect(push.engine_id, push.host, push.port)
        if job.fail is not None or job.offset is None:
            if job.fail is not None:
                self._failed(job.request_id, job.fail)
            # an empty reservation: the prefill lets its slabs go without writing
            empty = dataclasses.replace(job, handoff=msgspec.structs.replace(job.handoff, slabs=[]))
            self._releases.append(Release(empty, now + self.settings.connect_timeout_s))
            return
        self._receives[job.request_id] = Receive(
            job, now + self.settings.connect_timeout_s, now, slabs=list(job.handoff.slabs)
        )

    def _advance_push_receive(self, req_id: str, r: Receive, now: float) -> None:
        job, push = r.job, r.job.push
        if r.state is ReceiveState.CONNECTING:
            if self.transport.is_connected(push.engine_id):
                try:
                    self.transport.notify(push.engine_id, NOTE_RESERVE + msgspec.json.encode(job.handoff))
                except Exception:
                    logger.warning("push reservation to %s failed", push.engine_id, exc_info=True)
                    self._drop(req_id, "push_reserve_error")
                    return
                r.state, r.read_started_s = ReceiveState.RESERVED, now
            elif now >= r.deadline:
                self._drop(req_id, "connect_timeout")  # nothing was reserved remotely: safe
                if hasattr(self.transport, "forget"):
                    self.transport.forget(push.engine_id)
            return
        note, r.note = r.note, None
        if note == NOTE_PUSHED:
            self._complete(req_id, r)
        elif note == NOTE_PUSH_FAILED:
            self._drop(req_id, "push_failed")
        elif self._wall() > job.handoff.deadline_unix_s + self.settings.expiry_margin_s:
            self._drop(req_id, "push_timeout")  # past the prefill's last write start + margin

    def _advance_receives(self) -> None:
        now = self._clock()
        for req_id, r in list(self._receives.items()):
            if r.is_push:
                self._advance_push_receive(req_id, r, now)
                continue
            if r.state is ReceiveState.CONNECTING:
                if self.transport.is_connected(r.peer):
                    self._start_read(r, now)
                elif now >= r.deadline:
                    self._drop(req_id, "connect_timeout")
                    if hasattr(self.transport, "forget"):
                        self.transport.forget(r.peer)
                if r.state is not ReceiveState.READING:
                    continue
                # polled at once: a same-host READ (UCX cma) is done when its post returns; left for
                # later, an idle step would first sleep idle_wait_ms in wait_for_save
            state = self.transport.poll(r.handle)
            if state is TransferState.DONE:
                self.transport.release(r.handle)
                self._complete(req_id, r)
            elif state is TransferState.FAILED:
                self.transport.release(r.handle)
                self._drop(req_id, "read_error")
            elif now >= r.deadline:
                self.transport.release(r.handle)
                self._drop(req_id, "read_timeout")

    def _start_read(self, r: Receive, now: float) -> None:
        job = r.job
        r.slabs = [s for s in job.handoff.slabs if s.first_block + s.num_blocks > job.first_block]
        local, pos = [], self.pool.data_ptr() + job.offset
        for s in r.slabs:
            local.append((pos, s.nbytes))
            pos += s.nbytes
        try:
            r.handle = self.transport.read(
                job.handoff.engine_id, local, [(s.addr, s.nbytes) for s in r.slabs], job.handoff.request_id.encode()
            )
        except Exception:
            logger.warning("starting the slab read for %s failed", job.request_id, exc_info=True)
            self._drop(job.request_id, "read_error")
            return
        r.state, r.read_started_s = ReceiveState.READING, now
        r.deadline = now + self.settings.read_timeout_s

    def _complete(self, req_id: str, r: Receive) -> None:
        job, h = r.job, r.job.handoff
        t_read = self._clock() - r.read_started_s
        try:
            self._unpacker.unpack(job, r.slabs)
        except Exception:
            logger.warning("decoding the slabs of %s failed", req_id, exc_info=True)
            del self._receives[req_id]
            self._failed(req_id, "decode_error")
            return
        del self._receives[req_id]
        self._finished.received.add(req_id)
        st = self.stats
        st.num_handoffs_received += 1
        st.num_slabs += len(r.slabs)
        st.num_descriptors += len(r.slabs)
        st.wire_bytes += sum(s.nbytes for s in r.slabs)
        st.raw_bytes += self._unpacker.codec_for(h).raw_nbytes(sum(s.num_blocks for s in r.slabs))  # sender blocks
        st.transfer_s.append(t_read)
        st.handoff_s.append(self._clock() - r.started_s)

    def _drop(self, req_id: str, reason: str) -> None:
        r = self._receives.pop(req_id)
        if r.is_push:  # the prefill frees on its own timeout
            logger.warning("slab push for %s failed (%s); recomputing locally", req_id, reason)
            self._failed(req_id, reason)
            return
        self._fail(req_id, reason, r.job.handoff)

    def _fail(self, req_id: str, reason: str, handoff: SlabHandoff) -> None:
        logger.warning("slab handoff for %s failed (%s); recomputing locally", req_id, reason)
        self._failed(req_id, reason)
        if self.transport.is_connected(handoff.engine_id):
            self._notify(handoff)

    def _failed(self, req_id: str, reason: str) -> None:
        self.stats.fail(reason)
        self._finished.received.add(req_id)
        self._finished.failed.add(req_id)

    def _notify(self, handoff: SlabHandoff) -> None:
        try:
            self.transport.notify(handoff.engine_id, handoff.request_id.encode())
        except Exception:
            logger.warning("release notification to %s failed", handoff.engine_id, exc_info=True)

    def _advance_releases(self) -> None:
        now, keep = self._clock(), []
        for rel in self._releases:
            job = rel.job
            if job.push is not None:
                if self.transport.is_connected(job.push.engine_id):
                    try:
                        self.transport.notify(job.push.engine_id, NOTE_RESERVE + msgspec.json.encode(job.handoff))
                    except Exception:
                        logger.warning("push release to %s failed", job.push.engine_id, exc_info=True)
                elif now < rel.deadline:
                    keep.append(rel)
                continue
            if self.transport.is_connected(job.handoff.engine_id):
                self._notify(job.handoff)
            elif now < rel.deadline:
                keep.append(rel)
        self._releases = keep

    # ----------------------------------------------------------------------------- misc
    def take_stats(self) -> KVTransferStats | None:
        if self.stats.is_empty():
            return None
        out, self.stats = self.stats, KVTransferStats()
        return out

    def shutdown(self) -> None:
        if self.transport is not None:
            for r in self._receives.values():
                if r.handle is not None:
                    self.transport.release(r.handle)
            self._receives.clear()
            self._pusher.shutdown()
            self.transport.close()
            self.transport = None
