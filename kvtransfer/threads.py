"""Run NIXL's helper threads at idle priority, so they never take the engine's core from a transfer.

A NIXL agent starts threads of its own: the progress thread, the metadata listener and UCX's async
event thread. An engine is pinned to one core, and these threads inherit that pin. UCX's worker
lock is a spinlock. While the engine thread holds it for a READ (UCX ``cma`` copies inside the post,
so it holds the lock for the whole copy), the progress thread spins on the lock on the same core
and takes half of it. Measured with ``kvtransfer/xfer_microbench.py``: the copy then runs at half
speed. Under ``SCHED_IDLE`` the kernel runs the helpers only when the engine thread has nothing to
do, and an idle engine is exactly when their progress is needed. Over a transport where the target
must progress transfers itself (UCX ``tcp`` between hosts), a target busy computing would then serve
reads only between its steps; turn this off there (``idle_nixl_threads: false``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

logger = logging.getLogger(__name__)
T = TypeVar("T")
TASKS = Path("/proc/self/task")


def _tids() -> set[int]:
    try:
        return {int(t) for t in os.listdir(TASKS)}
    except OSError:
        return set()


def set_idle(tids: set[int]) -> int:
    """Put threads ``tids`` of this process under ``SCHED_IDLE``; returns how many it changed."""
    policy = getattr(os, "SCHED_IDLE", None)
    if policy is None:
        return 0
    done = 0
    for tid in tids:
        try:
            os.sched_setscheduler(tid, policy, os.sched_param(0))
            done += 1
        except OSError:                     # the thread exited meanwhile, or the policy is not allowed
            pass
    return done


def with_idle_threads(build: Callable[[], T], enabled: bool = True) -> T:
    """Call ``build()``; every thread it started (and that is still alive) runs at idle priority."""
    if not enabled:
        return build()
    before = _tids()
    result = build()
    new = _tids() - before
    changed = set_idle(new)
    logger.debug("%d of %d new threads set to SCHED_IDLE", changed, len(new))
    return result
