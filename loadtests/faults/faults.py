"""Fault injection from outside the product: find a pool replica's vLLM engine processes and kill or
pause them with signals (psutil). Used by the integration tests (tests/integration/test_faults.py) and
the fault run under load (loadtests/faults/faults_run.py).

A Ray Serve replica actor is a process whose title (``/proc/<pid>/cmdline``, set by Ray) contains
``ServeReplica:<app_name>:<deployment>``; pools deploy as ``pool-<pool name>`` (serve/app.py). vLLM's
engine processes are its descendants titled ``VLLM::EngineCore`` (vllm/v1/engine/core.py) and, with a
multiprocess executor, ``VLLM::Worker...`` (vllm/v1/executor/multiproc_executor.py); the prefix is
``VLLM_PROCESS_NAME_PREFIX`` (default ``VLLM``), set with setproctitle (vllm/utils/system_utils.py).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Iterator

import psutil

ENGINE_TITLE_PREFIX = "VLLM::"


def _title(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline()) or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return ""


def _is_engine(p: psutil.Process) -> bool:
    try:  # name(): the kernel's 15-character copy of the title
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return _title(p).startswith(ENGINE_TITLE_PREFIX) or p.name().startswith(ENGINE_TITLE_PREFIX)
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return False


def replica_processes(app_name: str, pool: str) -> list[psutil.Process]:
    """The live replica actor processes of ``pool`` in Serve application ``app_name``."""
    # "pool-decode" must not match "pool-decode2": the deployment name ends at a non-name character
    pattern = re.compile(rf"ServeReplica:{re.escape(app_name)}:pool-{re.escape(pool)}(?![\w-])")
    return [p for p in psutil.process_iter() if pattern.search(_title(p))]


def engine_processes_of(replica: psutil.Process) -> list[psutil.Process]:
    """The live ``VLLM::*`` descendants of one replica process (none if it is gone)."""
    try:
        children = replica.children(recursive=True)
    except psutil.NoSuchProcess:
        return []
    return [c for c in children if _is_engine(c)]


def engine_processes(app_name: str, pool: str, timeout_s: float = 10.0) -> list[psutil.Process]:
    """Every ``VLLM::*`` descendant of the pool's replicas; raises if none shows up within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        found = [e for replica in replica_processes(app_name, pool) for e in engine_processes_of(replica)]
        if found:
            return found
        if time.monotonic() > deadline:
            raise AssertionError(
                f"no {ENGINE_TITLE_PREFIX}* process under a ServeReplica:{app_name}:pool-{pool} "
                f"process within {timeout_s}s"
            )
        time.sleep(0.25)


def _dead(p: psutil.Process) -> bool:
    """Gone, or a zombie (dead; its parent, not us, reaps it)."""
    try:
        return p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def kill(procs: list[psutil.Process], timeout_s: float = 10.0) -> None:
    """SIGKILL ``procs`` and wait (at most ``timeout_s``) until every one is dead."""
    for p in procs:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    deadline = time.monotonic() + timeout_s
    while not all(_dead(p) for p in procs):
        assert time.monotonic() < deadline, f"still running {timeout_s}s after SIGKILL: {procs}"
        time.sleep(0.05)


class Pause:
    """``procs`` stopped (SIGSTOP) until ``seconds`` have passed or :meth:`resume` is called, whichever
    is first; ``resumed`` is set once they got SIGCONT."""

    def __init__(self, procs: list[psutil.Process], seconds: float) -> None:
        self.procs = procs
        self.resumed = threading.Event()
        self._lock = threading.Lock()
        self._timer = threading.Timer(seconds, self.resume)
        self._timer.daemon = True

    def start(self) -> None:
        for p in self.procs:
            p.suspend()
        self._timer.start()

    def resume(self) -> None:
        with self._lock:
            if self.resumed.is_set():
                return
            self._timer.cancel()
            for p in self.procs:
                with contextlib.suppress(psutil.NoSuchProcess):
                    p.resume()
            self.resumed.set()


@contextlib.contextmanager
def paused(procs: list[psutil.Process], seconds: float) -> Iterator[Pause]:
    """Stop ``procs`` for ``seconds`` (a timer sends SIGCONT); leaving the block resumes them at once if
    the timer has not yet, also on an exception, so a test never leaves an engine stopped."""
    pause = Pause(procs, seconds)
    try:
        pause.start()
        yield pause
    finally:
        pause.resume()
