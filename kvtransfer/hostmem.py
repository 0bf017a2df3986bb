"""Host memory for the slab pool: an anonymous mapping, optionally backed by transparent huge pages.

Why huge pages: a cross-process READ on one host goes through UCX's ``cma`` transport, i.e. the
kernel's ``process_vm_readv``, which pins and copies the source's pages one 4 KiB page at a time. On
this kind of VM that runs at ~40 % of memcpy for 4 KiB pages and at memcpy speed when the source sits
on 2 MiB pages (``loadtests/kv/kv_xfer_microbench.py`` measures both side by side). RDMA NICs likewise
need fewer translation entries for huge pages. Hosts whose THP mode is ``madvise`` (a common
default) only give huge pages to regions that ask with ``madvise(MADV_HUGEPAGE)``; with ``never``
the advice is a no-op and the pool is ordinary memory.

No torch or NIXL here beyond wrapping the mapping as a uint8 tensor.
"""

from __future__ import annotations

import functools
import mmap
import sys
from pathlib import Path

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = getattr(mmap, "MADV_HUGEPAGE", 14)
MADV_POPULATE_WRITE = 23  # Linux >= 5.14: fault every page in, writable, in one call
MADV_COLLAPSE = 25  # Linux >= 6.1: move already-populated memory onto huge pages now
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str:
    """The kernel's transparent-huge-page mode (``always`` / ``madvise`` / ``never``; ``unknown``)."""
    try:
        text = THP_MODE_FILE.read_text()
    except OSError:
        return "unknown"
    return text[text.find("[") + 1 : text.find("]")] if "[" in text else "unknown"


def alloc_host(nbytes: int, huge_pages: bool = True, prefault: bool = True) -> torch.Tensor:
    """A uint8 tensor of ``nbytes`` on its own anonymous mapping, 2 MiB aligned.

    ``huge_pages`` asks for transparent huge pages (``MADV_HUGEPAGE``) before any page is touched;
    ``prefault`` makes every page resident now (``MADV_POPULATE_WRITE``, else one write per page),
    so no later copy into the region pays a page fault. The tensor keeps the mapping alive.
    """
    if nbytes <= 0:
        raise ValueError("nbytes must be positive")
    size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
    # one spare huge page so the tensor can start on a 2 MiB boundary whatever address mmap returns
    mm = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    whole = torch.frombuffer(mm, dtype=torch.uint8)
    start = -whole.data_ptr() % HUGE_PAGE
    if huge_pages and sys.platform.startswith("linux"):
        try:
            mm.madvise(MADV_HUGEPAGE, start, size)
        except (OSError, ValueError):
            pass  # THP unsupported: ordinary pages
    tensor = whole[start : start + nbytes]
    if prefault:
        try:
            mm.madvise(MADV_POPULATE_WRITE, start, size)
        except (OSError, ValueError):
            tensor.zero_()  # older kernels: touch every page
    return tensor


@functools.cache
def _libc():
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def collapse_to_huge_pages(tensor: torch.Tensor) -> bool:
    """Move an existing CPU tensor's memory (e.g. vLLM's KV cache, allocated before any connector sees
    it) onto transparent huge pages: ``MADV_HUGEPAGE`` then ``MADV_COLLAPSE`` over the 2 MiB-aligned
    interior. Contents are kept. False (and nothing changed) where the kernel or platform says no."""
    if tensor.device.type != "cpu" or not sys.platform.startswith("linux"):
        return False
    lo = tensor.data_ptr()
    hi = lo + tensor.numel() * tensor.element_size()
    start, end = -(-lo // HUGE_PAGE) * HUGE_PAGE, hi // HUGE_PAGE * HUGE_PAGE
    if end <= start:
        return False
    libc = _libc()
    return libc.madvise(start, end - start, MADV_HUGEPAGE) == 0 and libc.madvise(start, end - start, MADV_COLLAPSE) == 0


def huge_page_bytes(tensor: torch.Tensor) -> int:
    """Bytes of ``tensor``'s mapping that sit on transparent huge pages (from /proc/self/smaps); 0
    when unknown. For tests and start-up logs."""
    lo, hi = tensor.data_ptr(), tensor.data_ptr() + tensor.numel() * tensor.element_size()
    try:
        lines = Path("/proc/self/smaps").read_text().splitlines()
    except OSError:
        return 0
    inside, total = False, 0
    for line in lines:
        head = line.split(" ", 1)[0]
        if "-" in head and all(c in "0123456789abcdef-" for c in head):
            a, b = (int(x, 16) for x in head.split("-"))
            inside = a < hi and lo < b  # this mapping overlaps the tensor
        elif inside and line.startswith("AnonHugePages:"):
            total += int(line.split()[1]) * 1024
    return total
