"""vLLM general plugin (entry point ``vllm.general_plugins`` -> ``pdserve``): process-plumbing fixes
applied inside every vLLM engine process pdserve starts (engine core and model workers alike, any KV
connector or none).

vLLM loads general plugins in each of its processes, including engines other programs start from the
same environment; the fixes therefore only apply when pdserve's engine environment is present
(``PDSERVE_MQ_BUSY_LOOP_S``, set by workers/engine.py ``device_env``). Idempotent.

The fix: vLLM's engine core and its worker talk over a shared-memory ring whose readers first spin
(``sched_yield``) for ``busy_loop_s`` = 1 s after every read, then sleep on a ZMQ notification.

- Spinning: the engine core reads the worker's reply every step, so it spins through every forward
  pass (measured: 63% of a core) on whatever core the OS gives it, typically the OTHER engine's pinned
  core on a small box. Readers in pdserve's engines stop spinning after ``PDSERVE_MQ_BUSY_LOOP_S`` (default 0).
- Lost wake-ups: the notification is best-effort (PUB with ``SNDHWM=1`` drops silently, the SUB side
  conflates). A reader that sleeps through a dropped notification only re-checks the ring after
  ``SHM_READER_RECHECK_INTERVAL_MS`` = 5 s (vLLM PR #45224). With spinning off, sleeping is the common
  path and every dropped notification freezes the engine for ~5.1 s: all its streams stall together
  (measured: client inter-token p99 5.1 s, py-spy showing engine core and worker both waiting on the
  ring; loadtests/results/README.md). Their sleeps re-check after ``PDSERVE_MQ_RECHECK_MS``
  (default 1 ms): a dropped notification costs at most that, an idle reader wakes 1000x/s.
  Dropped notifications are the common case, not the exception: with a 10 ms re-check a one-core decode
  step at batch 1 takes 43 ms, with 1 ms 33 ms (the same as vLLM spinning on two cores).
"""

from __future__ import annotations

import functools
import os

from workers.engine_env import MQ_BUSY_LOOP_ENV, MQ_RECHECK_ENV

DEFAULT_RECHECK_MS = 1


def bounded_wait_timeout(timeout_ms: int | None, recheck_ms: int) -> int:
    """Poll timeout of one sleep of a ring reader: never longer than ``recheck_ms`` (pure)."""
    return recheck_ms if timeout_ms is None else min(timeout_ms, recheck_ms)


def register() -> None:
    """Entry point: patch vLLM's shared-memory queue readers if this is a pdserve engine process."""
    if MQ_BUSY_LOOP_ENV not in os.environ:
        return
    try:
        from vllm.distributed.device_communicators.shm_broadcast import SpinCondition
    except ImportError:  # a vLLM without it: nothing to fix
        return
    if getattr(SpinCondition.wait, "_pdserve", False):
        return
    busy_limit = float(os.environ[MQ_BUSY_LOOP_ENV])
    recheck_ms = max(1, int(os.environ.get(MQ_RECHECK_ENV, DEFAULT_RECHECK_MS)))
    original = SpinCondition.wait

    @functools.wraps(original)
    def wait(self, timeout_ms=None):
        self.busy_loop_s = min(self.busy_loop_s, busy_limit)
        return original(self, timeout_ms=bounded_wait_timeout(timeout_ms, recheck_ms))

    wait._pdserve = True
    SpinCondition.wait = wait
