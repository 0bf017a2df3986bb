"""Listening ports picked at start, outside the kernel's ephemeral range.

A port taken with ``bind(0)`` comes from the ephemeral range and goes back to it when the probe
socket closes; before the real listener (vLLM's NIXL handshake socket, a NIXL agent) binds it, any
outgoing connection on the host (Ray opens many) may take it: "Address already in use", and vLLM's
handshake listener thread dies while the engine waits for it forever. Ports below the ephemeral range
are never handed to outgoing connections, so only another deliberate listener can collide with a pick,
and a random pick among ~20k ports checked by a test bind makes that unlikely.
"""

from __future__ import annotations

import random
import socket

_FLOOR = 20000  # above the usual fixed service ports
_DEFAULT_EPHEMERAL = (32768, 60999)  # Linux default


def ephemeral_range(path: str = "/proc/sys/net/ipv4/ip_local_port_range") -> tuple[int, int]:
    try:
        with open(path) as f:
            lo, hi = (int(x) for x in f.read().split()[:2])
        return lo, hi
    except (OSError, ValueError):
        return _DEFAULT_EPHEMERAL


def _bindable(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def candidate_ranges(eph: tuple[int, int]) -> list[tuple[int, int]]:
    """Port ranges (inclusive bounds) outside the ephemeral one, each at least 1000 ports wide."""
    lo, hi = eph
    return [r for r in ((_FLOOR, lo - 1), (hi + 1, 65535)) if r[1] - r[0] >= 1000]


def free_port(host: str = "127.0.0.1", rng: random.Random | None = None, attempts: int = 64) -> int:
    """A port ``host`` can listen on now, chosen outside the ephemeral range when there is room
    (falls back to the kernel's ``bind(0)`` choice otherwise)."""
    rng = rng or random.SystemRandom()
    ranges = candidate_ranges(ephemeral_range())
    for _ in range(attempts if ranges else 0):
        a, b = rng.choice(ranges)
        port = rng.randint(a, b)
        if _bindable(host, port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]
