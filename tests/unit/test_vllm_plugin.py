"""workers/vllm_plugin.py against vLLM's real shared-memory queue wake-up (no engine)."""

import time

import pytest
import zmq
from vllm.distributed.device_communicators import shm_broadcast
from vllm.distributed.device_communicators.shm_broadcast import SpinCondition

from workers import vllm_plugin


def test_bounded_wait_timeout():
    assert vllm_plugin.bounded_wait_timeout(None, 10) == 10
    assert vllm_plugin.bounded_wait_timeout(5000, 10) == 10
    assert vllm_plugin.bounded_wait_timeout(3, 10) == 3


@pytest.fixture
def patched(monkeypatch):
    monkeypatch.setattr(SpinCondition, "wait", SpinCondition.wait)  # restored after the test
    monkeypatch.setenv(vllm_plugin.MQ_BUSY_LOOP_ENV, "0")
    monkeypatch.setenv(vllm_plugin.MQ_RECHECK_ENV, "20")
    vllm_plugin.register()
    vllm_plugin.register()  # idempotent
    assert SpinCondition.wait._pdserve


def _pair(tmp_path):
    ctx = zmq.Context()
    addr = f"ipc://{tmp_path}/notify"
    writer = SpinCondition(is_reader=False, context=ctx, notify_address=addr)
    reader = SpinCondition(is_reader=True, context=ctx, notify_address=addr, busy_loop_s=1.0)
    return ctx, writer, reader


def test_dropped_notification_costs_one_recheck_not_five_seconds(patched, tmp_path):
    ctx, _writer, reader = _pair(tmp_path)
    try:
        reader.last_read = 0.0
        # No notification ever arrives (the dropped-wake-up case). vLLM passes its 5 s recheck.
        t0 = time.monotonic()
        reader.wait(timeout_ms=shm_broadcast.SHM_READER_RECHECK_INTERVAL_MS)
        elapsed = time.monotonic() - t0
        assert 0.015 <= elapsed < 1.0, elapsed
        assert reader.busy_loop_s == 0  # spinning capped to PDSERVE_MQ_BUSY_LOOP_S
    finally:
        ctx.destroy(linger=0)


def test_not_a_pdserve_engine_leaves_vllm_alone(monkeypatch):
    monkeypatch.setattr(SpinCondition, "wait", SpinCondition.wait)
    monkeypatch.delenv(vllm_plugin.MQ_BUSY_LOOP_ENV, raising=False)
    before = SpinCondition.wait
    vllm_plugin.register()
    assert SpinCondition.wait is before


def test_registered_as_vllm_general_plugin():
    from importlib.metadata import entry_points

    eps = {ep.name: ep.value for ep in entry_points(group="vllm.general_plugins")}
    assert eps.get("pdserve") == "workers.vllm_plugin:register"
