"""The transport seam: the few NIXL agent primitives the slab worker needs, as a Protocol.

``NixlTransport`` (kvtransfer/nixl_transport.py) is the product implementation, on CPU too; unit
tests use an in-process fake. Descriptors are ``(addr, nbytes)`` pairs in registered memory. No call
blocks: connecting and transfers are started, then polled by the worker once per engine step.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any, Protocol

Desc = tuple[int, int]  # (address, nbytes)


class TransferState(enum.Enum):
    PENDING = "PROC"
    DONE = "DONE"
    FAILED = "ERR"


class Transport(Protocol):
    name: str  # this agent's name; peers address it by name

    def register_pool(self, pool: Any) -> None:
        """Register the slab pool once at start (never per request)."""

    def listen_address(self) -> tuple[str, int]:
        """Where peers fetch this agent's metadata."""

    def connect(self, peer: str, host: str, port: int) -> None:
        """Start fetching ``peer``'s metadata from ``host:port``. Idempotent; never blocks."""

    def is_connected(self, peer: str) -> bool:
        """True once ``peer``'s metadata is loaded (transfers and notifications may start)."""

    def read(self, peer: str, local: Sequence[Desc], remote: Sequence[Desc], notify: bytes) -> Any:
        """Start ONE transfer of ``len(remote)`` descriptors from the peer into local memory; the peer
        receives ``notify`` when it completes. Returns a handle for :meth:`poll`/:meth:`release`."""

    def write(self, peer: str, local: Sequence[Desc], remote: Sequence[Desc], notify: bytes) -> Any:
        """Start ONE transfer of local memory into the peer's (push mode); the peer receives ``notify``
        after the data landed. Returns a handle like :meth:`read`."""

    def poll(self, handle: Any) -> TransferState: ...

    def release(self, handle: Any) -> None:
        """Release a handle (aborting the transfer if still pending). Idempotent per handle."""

    def notify(self, peer: str, message: bytes) -> None:
        """A standalone notification to a connected peer."""

    def drain_notifications(self) -> list[tuple[str, bytes]]:
        """Notifications received since the last call, as ``(peer, message)``."""

    def close(self) -> None: ...
