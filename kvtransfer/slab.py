"""Slab planning and buffer-pool sizing (pure: no torch, no vLLM, no NIXL).

A slab is a run of a request's paged KV blocks, in token order, that moves as ONE transfer
descriptor: ``ceil(min_slab_tokens / block_size)`` blocks (so at least ``min_slab_tokens`` tokens)
across all layers; the last slab of a request may be shorter. vLLM's NixlConnector instead posts one
descriptor per block per layer region, so descriptor counts grow with blocks x layers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

MiB = 1 << 20


@dataclass(frozen=True, slots=True)
class SlabSpec:
    """Shape of the KV a slab carries. ``content_dim`` is the per-head, per-token width of one layer's
    cache entry (K and V packed together: 2 x head_dim on vLLM's CPU/GPU attention layouts)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    dtype_bytes: int
    min_slab_tokens: int = 128
    kv_per_entry: int = 2  # K and V

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "dtype_bytes", "min_slab_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"SlabSpec.{name} must be >= 1")

    @property
    def content_dim(self) -> int:
        return self.kv_per_entry * self.head_dim

    @property
    def blocks_per_slab(self) -> int:
        return math.ceil(self.min_slab_tokens / self.block_size)

    @property
    def kv_bytes_per_token(self) -> int:
        """2 x layers x kv_heads x head_dim x dtype bytes."""
        return self.num_layers * self.num_kv_heads * self.content_dim * self.dtype_bytes


@dataclass(frozen=True, slots=True)
class Slab:
    block_ids: tuple[int, ...]  # paged block ids, in token order
    token_start: int  # offset of the slab's first token in the request
    num_tokens: int  # tokens carried (the last slab may be partial)


@dataclass(frozen=True, slots=True)
class SlabPlan:
    slabs: tuple[Slab, ...]

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.slabs)

    @property
    def num_descriptors(self) -> int:
        return len(self.slabs)


def plan_slabs(block_ids: Sequence[int], num_tokens: int, spec: SlabSpec) -> SlabPlan:
    """Split ``num_tokens`` tokens held in ``block_ids`` (token order) into slabs.

    Only the blocks that hold the tokens are used (``ceil(num_tokens / block_size)``); every slab but
    the last has ``blocks_per_slab`` full blocks.
    """
    if num_tokens < 0:
        raise ValueError("num_tokens must be >= 0")
    needed = math.ceil(num_tokens / spec.block_size)
    if needed > len(block_ids):
        raise ValueError(f"{num_tokens} tokens need {needed} blocks of {spec.block_size}, got {len(block_ids)}")
    slabs = []
    per = spec.blocks_per_slab
    for first in range(0, needed, per):
        ids = tuple(block_ids[first : min(first + per, needed)])
        start = first * spec.block_size
        slabs.append(Slab(ids, start, min(len(ids) * spec.block_size, num_tokens - start)))
    return SlabPlan(tuple(slabs))


def pool_nbytes(
    spec: SlabSpec, max_tokens_in_flight: int, wire_bytes_per_token: int | None = None, round_to: int = 256 * MiB
) -> int:
    """Size of the pre-registered slab buffer pool: enough for ``max_tokens_in_flight`` tokens of KV
    (in wire format if given, e.g. compressed), rounded up to ``round_to`` (default 256 MiB)."""
    per_token = wire_bytes_per_token if wire_bytes_per_token is not None else spec.kv_bytes_per_token
    need = max(1, max_tokens_in_flight) * per_token
    return math.ceil(need / round_to) * round_to


class RangeAllocator:
    """First-fit byte-range allocator over a pre-registered pool (pure bookkeeping, no memory).

    ``allocate`` returns an offset aligned to ``align`` or None when no free range fits (the caller
    degrades: the handoff carries no slabs and the decode side recomputes). ``free`` takes the
    offset back; freeing an unknown offset raises (a double free is a bug, not a condition).
    """

    def __init__(self, capacity_bytes: int, align: int = 4096):
        self.capacity_bytes, self.align = capacity_bytes, align
        self._free: list[tuple[int, int]] = [(0, capacity_bytes)]  # sorted (offset, size)
        self._used: dict[int, int] = {}

    @property
    def used_bytes(self) -> int:
        return sum(self._used.values())

    @property
    def num_allocations(self) -> int:
        return len(self._used)

    def allocate(self, nbytes: int) -> int | None:
        size = max(self.align, math.ceil(nbytes / self.align) * self.align)
        for i, (off, free) in enumerate(self._free):
            if free >= size:
                rest = (off + size, free - size)
                self._free[i : i + 1] = [rest] if rest[1] else []
                self._used[off] = size
                return off
        return None

    def free(self, offset: int) -> None:
        size = self._used.pop(offset)
        self._free.append((offset, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for off, sz in self._free:
            if merged and merged[-1][0] + merged[-1][1] == off:
                merged[-1] = (merged[-1][0], merged[-1][1] + sz)
            else:
                merged.append((off, sz))
        self._free = merged
