"""Cluster-wide prefix index: block hash -> the replicas holding it, LRU-bounded. Pure: stdlib only.

Each replica gets a bit; an entry is ``short_key(hash) -> bitmask``. Fed by engine KV cache events
(stored / removed / cleared) or, when events are off, by the router's own record of what it routed
where. Lookups are longest-exact-prefix: a replica's hit stops at the first block it does not hold,
even if it holds later blocks.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from router.hashing import _MASK64, short_key


class PrefixIndex:
    def __init__(self, capacity_blocks: int = 1_000_000) -> None:
        if capacity_blocks < 1:
            raise ValueError("capacity_blocks must be >= 1")
        self.capacity = capacity_blocks
        self._entries: OrderedDict[int, int] = OrderedDict()
        self._bit: dict[str, int] = {}
        self._blocks: dict[str, int] = {}  # endpoint -> blocks it holds in the index
        self._free_bits: list[int] = []
        self.evictions = 0

    def __len__(self) -> int:
        return len(self._entries)

    def _bit_of(self, endpoint: str) -> int:
        bit = self._bit.get(endpoint)
        if bit is None:
            bit = self._free_bits.pop() if self._free_bits else len(self._bit)
            self._bit[endpoint] = bit
            self._blocks[endpoint] = 0
        return 1 << bit

    def add(self, endpoint: str, hashes: Iterable[bytes | int]) -> None:
        """The endpoint now holds these blocks (most recently used)."""
        mask = self._bit_of(endpoint)
        entries = self._entries
        added = 0
        for h in hashes:
            k = short_key(h)
            v = entries.get(k, 0)
            added += not v & mask
            entries[k] = v | mask
            entries.move_to_end(k)
        self._blocks[endpoint] += added
        while len(entries) > self.capacity:
            _, v = entries.popitem(last=False)
            self._uncount(v)
            self.evictions += 1

    def _uncount(self, v: int) -> None:
        for e, bit in self._bit.items():
            self._blocks[e] -= (v >> bit) & 1

    def remove(self, endpoint: str, hashes: Iterable[bytes | int]) -> None:
        """The endpoint evicted these blocks."""
        bit = self._bit.get(endpoint)
        if bit is None:
            return
        mask = ~(1 << bit)
        for h in hashes:
            k = short_key(h)
            v = self._entries.get(k)
            if v is not None:
                self._blocks[endpoint] -= (v >> bit) & 1
                v &= mask
                if v:
                    self._entries[k] = v
                else:
                    del self._entries[k]

    def drop_endpoint(self, endpoint: str) -> None:
        """All blocks of a replica are gone (cache cleared, replica removed)."""
        bit = self._bit.pop(endpoint, None)
        if bit is None:
            return
        del self._blocks[endpoint]
        mask = 1 << bit
        for k in [k for k, v in self._entries.items() if v & mask]:
            v = self._entries[k] & ~mask
            if v:
                self._entries[k] = v
            else:
                del self._entries[k]
        self._free_bits.append(bit)

    def endpoints(self) -> set[str]:
        """The replicas that have (or had, until dropped) blocks in the index."""
        return set(self._bit)

    def blocks_by_endpoint(self) -> dict[str, int]:
        """How many indexed blocks each replica holds."""
        return dict(self._blocks)

    def match(self, hashes: Sequence[bytes | int], endpoints: Iterable[str]) -> dict[str, int]:
        """Leading blocks of ``hashes`` each endpoint holds (longest exact prefix, in blocks).

        One pass over the prompt's blocks with bitmask arithmetic: cost O(blocks), independent of
        the number of endpoints; stops at the first block no candidate holds."""
        result = {e: 0 for e in endpoints}
        bits = {e: 1 << self._bit[e] for e in result if e in self._bit}
        live = 0
        for m in bits.values():
            live |= m
        depth: dict[int, int] = {}  # endpoint bit -> blocks matched before it dropped out
        entries = self._entries
        i = 0
        for i, h in enumerate(hashes):  # noqa: B007 (i is read after the loop)
            if not live:
                break
            k = h & _MASK64 if type(h) is int else short_key(h)  # ints: already keys (fast path)
            v = entries.get(k, 0)
            if v & live:
                entries.move_to_end(k)
            gone = live & ~v
            while gone:
                low = gone & -gone
                depth[low] = i
                gone ^= low
            live &= v
        else:
            i = len(hashes)
        while live:  # held every block
            low = live & -live
            depth[low] = i
            live ^= low
        for e, m in bits.items():
            result[e] = depth.get(m, 0)
        return result
