"""Listening-port picks stay out of the kernel's ephemeral range (kvtransfer/ports.py)."""

import random
import socket

from kvtransfer import ports


def test_ephemeral_range_reads_the_kernel_file_and_falls_back(tmp_path):
    f = tmp_path / "range"
    f.write_text("40000\t50000\n")
    assert ports.ephemeral_range(str(f)) == (40000, 50000)
    assert ports.ephemeral_range(str(tmp_path / "missing")) == (32768, 60999)


def test_candidate_ranges_exclude_the_ephemeral_range():
    assert ports.candidate_ranges((32768, 60999)) == [(20000, 32767), (61000, 65535)]
    assert ports.candidate_ranges((1024, 65535)) == []  # no room: the caller falls back to bind(0)


def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    lo, hi = ports.ephemeral_range()
    rng = random.Random(7)
    picked = {ports.free_port("127.0.0.1", rng=rng) for _ in range(20)}
    for port in picked:
        assert not lo <= port <= hi
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # really free


def test_taken_port_is_never_returned(monkeypatch):
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        taken = held.getsockname()[1]
        held.listen()
        monkeypatch.setattr(ports, "candidate_ranges", lambda eph: [(taken, taken)])
        port = ports.free_port("127.0.0.1", attempts=3)  # every pick collides -> kernel's choice
        assert port != taken
