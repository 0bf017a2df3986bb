"""The slab worker's transfers in flight, one state object each (pure data; the worker drives them).

Decode side::

    Receive (pull)   CONNECTING --peer metadata loaded--> READING --READ done--> scattered, finished
                     (connect_timeout_s)                  (read_timeout_s)
    Receive (push)   CONNECTING --peer metadata loaded--> RESERVED --"pushed"--> scattered, finished
                     (connect_timeout_s)                  (until the reservation's deadline + expiry_margin_s)
    Release          nothing to load: tell the prefill once its agent is reachable (connect_timeout_s)

Prefill side (push mode; pull handoffs are the PrefillLedger's)::

    PushSend   AWAITING_PACK | AWAITING_RESERVATION --both here--> CONNECTING --peer loaded--> WRITING --> done

Any failure leaves the object's collection at once: the worker reports it and, where the peer is
reachable, tells it (kvtransfer/worker_side.py).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvtransfer.metadata import PackJob, RecvJob
    from kvtransfer.wire import SlabHandoff


class ReceiveState(enum.Enum):
    CONNECTING = "connecting"  # fetching the prefill agent's metadata
    READING = "reading"  # pull: the READ is posted
    RESERVED = "reserved"  # push: our reservation went out, waiting for the prefill's write


@dataclass
class Receive:
    """Decode side: one request's KV on its way into our pool (pull READ or push reservation)."""

    job: RecvJob
    deadline: float  # CONNECTING: connect deadline; READING: read deadline
    started_s: float
    state: ReceiveState = ReceiveState.CONNECTING
    handle: object | None = None  # READING: the transport's handle
    read_started_s: float = 0.0
    slabs: list = field(default_factory=list)  # the SlabDescs being loaded
    note: bytes | None = None  # push: the prefill's "pushed" / "pushfail" notification, once it came

    @property
    def is_push(self) -> bool:
        return self.job.push is not None

    @property
    def peer(self) -> str:
        """The prefill's agent."""
        return self.job.push.engine_id if self.job.push is not None else self.job.handoff.engine_id


@dataclass
class Release:
    """Decode side, nothing to load (a full local prefix hit, or a failed push): the prefill only needs
    to hear it can let its slabs go, a read-done notification (pull) or an empty reservation (push)."""

    job: RecvJob
    deadline: float  # give up reaching the prefill's agent at this time


class PushState(enum.Enum):
    AWAITING_PACK = "awaiting_pack"  # the decode's reservation came before our pack
    AWAITING_RESERVATION = "awaiting_reservation"  # packed; the decode's reservation has not come
    CONNECTING = "connecting"  # both here; fetching the decode agent's metadata
    WRITING = "writing"  # the WRITE is posted


@dataclass
class PushSend:
    """Prefill side, push mode: the slabs packed for one rendezvous and the decode's reservation for them."""

    rendezvous: str
    job: PackJob | None = None
    local: list = field(default_factory=list)  # (addr, nbytes) of each packed slab in our pool
    reservation: SlabHandoff | None = None
    handle: object | None = None  # WRITING: the transport's handle
    state: PushState = PushState.AWAITING_PACK

    def on_packed(self, job: PackJob, local: list) -> None:
        self.job, self.local = job, local
        self.state = PushState.AWAITING_RESERVATION if self.reservation is None else PushState.CONNECTING

    def on_reservation(self, reservation: SlabHandoff) -> None:
        self.reservation = reservation
        if self.state is PushState.AWAITING_RESERVATION:
            self.state = PushState.CONNECTING


@dataclass
class Note:
    """A notification for a peer whose metadata may still be on its way."""

    peer: str
    message: bytes
    deadline: float  # dropped if the peer is not reachable by then


@dataclass
class Finished:
    """Decode side: what ``get_transfer_results`` reports next, request ids since its last call."""

    received: set[str] = field(default_factory=set)  # decode: finished_recving (success or failure)
    failed: set[str] = field(default_factory=set)  # decode: failed_recving (vLLM recomputes)
