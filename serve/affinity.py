"""Which cores a local Ray's processes run on.

Ray's processes (GCS, raylet, Serve controller and proxy, the ingress, each replica's event loop and
its engine's scheduler process) inherit the CPU affinity of the process that starts Ray. An engine's
compute threads are pinned by vLLM to their ``device.cpu_cores`` whatever they inherit. So starting
Ray with the cores that no decode engine computes on keeps the whole serving stack off the decode
cores: a token's trip through the proxy and the ingress never preempts the next decode step.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterable, Iterator

from workers.config import CpuDevice, PoolConfig, PoolRole, binding_cores

logger = logging.getLogger(__name__)


def decode_cores(pools: Iterable[PoolConfig]) -> set[int] | None:
    """Cores the decode pools' engines are pinned to; None when any decode engine is not pinned."""
    out: set[int] = set()
    for pool in pools:
        if pool.role is not PoolRole.DECODE or not isinstance(pool.device, CpuDevice):
            continue
        bindings = [pool.device.cpu_cores] if isinstance(pool.device.cpu_cores, str) else pool.device.cpu_cores
        for b in bindings:
            cores = binding_cores(b)
            if cores is None:
                return None
            out |= cores
    return out


def serving_cores(setting: str, pools: Iterable[PoolConfig], available: set[int]) -> set[int] | None:
    """The cores Ray's processes get (pure): None = leave the affinity as it is. ``auto`` takes the
    ``available`` cores minus the decode engines'; if that leaves none, nothing is restricted."""
    if setting == "all":
        return None
    if setting != "auto":
        chosen = (binding_cores(setting) or set()) & available
        return chosen or None
    pinned = decode_cores(pools)
    if not pinned:
        return None
    rest = available - pinned
    return rest if rest and rest != available else None


@contextlib.contextmanager
def inherited_affinity(cores: set[int] | None) -> Iterator[None]:
    """Within the block, this process (and every process it starts) runs on ``cores``; restored after."""
    if not cores or not hasattr(os, "sched_setaffinity"):
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cores)
    logger.info("local Ray processes run on cores %s", sorted(cores))
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)
