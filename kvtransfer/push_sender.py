"""PushSender: the prefill side of push mode in the slab worker.

A decode engine reserves a range of its own pool for the whole prompt and sends the reservation (a
SlabHandoff of that range) to our agent; once our prefill packed the same rendezvous, we WRITE the
slabs there with a "pushed" notification and count the write's completion as the read-done. A
reservation that cannot take our slabs (another layout, another prompt, too close to its deadline)
or a failed write tells the decode "pushfail" so it recomputes at once. Safety of the decode's range:
we never start a write after ``reservation.deadline - expiry_margin_s`` (the decode frees the range
only at ``deadline + expiry_margin_s``). One PushSend per rendezvous (kvtransfer/transfers.py).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from kvtransfer.config import SlabConnectorSettings
from kvtransfer.metadata import PackJob
from kvtransfer.transfers import Note, PushSend, PushState
from kvtransfer.transport import TransferState, Transport
from kvtransfer.wire import NOTE_PUSH_FAILED, NOTE_PUSHED, SlabHandoff

logger = logging.getLogger(__name__)


class PushSender:
    def __init__(
        self,
        settings: SlabConnectorSettings,
        clock: Callable[[], float],
        wall: Callable[[], float],
        fail: Callable[[str], None],
    ):
        self.settings = settings
        self._clock, self._wall, self._fail = clock, wall, fail
        self.transport: Transport | None = None  # set once the worker's agent exists
        self.layout: tuple | None = None  # our KV layout, as a reservation states it
        self.pushes: dict[str, PushSend] = {}  # rendezvous -> its push
        self.outbox: list[Note] = []  # "pushfail" notes waiting for their peer
        self.pushed: set[str] = set()  # prefill request ids written (or let go)

    def on_packed(self, job: PackJob, local: list) -> None:
        prior = self.pushes.get(job.push)
        send = PushSend(job.push)
        if prior is not None and prior.state is PushState.AWAITING_PACK:
            send.reservation = prior.reservation  # the decode's reservation came first
        send.on_packed(job, local)
        self.pushes[job.push] = send

    def on_reservation(self, reservation: SlabHandoff) -> None:
        self.pushes.setdefault(reservation.request_id, PushSend(reservation.request_id)).on_reservation(reservation)

    def busy(self) -> bool:
        """A packed push or an undelivered note (a reservation waiting for our pack does not count)."""
        return bool(self.outbox) or any(s.state is not PushState.AWAITING_PACK for s in self.pushes.values())

    def take_pushed(self) -> set[str]:
        out, self.pushed = self.pushed, set()
        return out

    def _mismatch(self, send: PushSend) -> str | None:
        """Why the reservation cannot take our slabs (None: it can)."""
        res, job = send.reservation, send.job
        if (
            res.block_size,
            res.num_layers,
            res.num_kv_heads,
            res.head_dim,
            res.dtype,
            res.k_transposed,
            res.group,
        ) != self.layout:
            return "push_layout"
        if res.compression != job.compression or [(d.nbytes, d.num_blocks) for d in res.slabs] != list(
            zip(job.slab_nbytes, job.slab_blocks)
        ):
            return "push_mismatch"
        if self._wall() > res.deadline_unix_s - self.settings.expiry_margin_s:
            return "push_expired"
        return None

    def advance(self) -> None:
        """Start the WRITE of every packed push whose reservation arrived; finish completed ones."""
        for rendezvous, send in list(self.pushes.items()):
            if send.state in (PushState.AWAITING_PACK, PushState.AWAITING_RESERVATION):
                continue
            res = send.reservation
            if send.state is PushState.CONNECTING:
                if not res.slabs:  # the decode needs nothing: let go
                    self._end(rendezvous, None)
                    continue
                problem = self._mismatch(send)
                if problem is not None:
                    logger.warning("cannot push %s to %s (%s)", send.job.request_id, res.engine_id, problem)
                    self._end(rendezvous, problem)
                    continue
                self.transport.connect(res.engine_id, res.host, res.port)
                if not self.transport.is_connected(res.engine_id):
                    continue  # the ledger's timeout bounds the wait
                try:
                    send.handle = self.transport.write(
                        res.engine_id,
                        send.local,
                        [(d.addr, d.nbytes) for d in res.slabs],
                        NOTE_PUSHED + rendezvous.encode(),
                    )
                except Exception:
                    logger.warning("starting the push of %s failed", send.job.request_id, exc_info=True)
                    self._end(rendezvous, "push_error")
                    continue
                send.state = PushState.WRITING
            state = self.transport.poll(send.handle)
            if state is TransferState.DONE:
                self.transport.release(send.handle)
                send.handle = None  # (bytes/descriptors: counted by the decode)
                self._end(rendezvous, None, notify=False)
            elif state is TransferState.FAILED:
                self.transport.release(send.handle)
                send.handle = None
                self._end(rendezvous, "push_error")
        self._send_outbox()
        now = self._wall()
        for rendezvous, send in list(self.pushes.items()):
            if (
                send.state is PushState.AWAITING_PACK
                and now > send.reservation.deadline_unix_s + self.settings.expiry_margin_s
            ):
                del self.pushes[rendezvous]  # its prefill never came (or was aborted)

    def _end(self, rendezvous: str, failure: str | None, notify: bool = True) -> None:
        """Release the prefill side of a push; a failure also tells the decode to recompute now."""
        send = self.pushes.pop(rendezvous)
        self.pushed.add(send.job.request_id)
        if failure is not None:
            self._fail(failure)
            if notify:
                res = send.reservation
                self.transport.connect(res.engine_id, res.host, res.port)
                self.outbox.append(
                    Note(
                        res.engine_id,
                        NOTE_PUSH_FAILED + rendezvous.encode(),
                        self._clock() + self.settings.connect_timeout_s,
                    )
                )
                self._send_outbox()

    def _send_outbox(self) -> None:
        """Notifications to peers whose metadata may still be on its way (bounded by connect_timeout_s)."""
        now, keep = self._clock(), []
        for note in self.outbox:
            if self.transport.is_connected(note.peer):
                try:
                    self.transport.notify(note.peer, note.message)
                except Exception:
                    logger.warning("notification to %s failed", note.peer, exc_info=True)
            elif now < note.deadline:
                keep.append(note)
        self.outbox = keep

    def forget(self, req_ids: set[str]) -> None:
        """Pushes whose prefill handoff timed out: abort an in-flight write, forget the slabs."""
        for rendezvous, send in list(self.pushes.items()):
            if send.job is not None and send.job.request_id in req_ids:
                if send.handle is not None:
                    self.transport.release(send.handle)
                del self.pushes[rendezvous]
        self.pushed -= req_ids

    def shutdown(self) -> None:
        for send in self.pushes.values():
            if send.handle is not None:
                self.transport.release(send.handle)
        self.pushes.clear()
