"""router/hashing.py (must equal vLLM's block hashes) and router/prefix_index.py."""

import random
import time

import pytest

from router.hashing import block_hashes, none_hash, short_key
from router.prefix_index import PrefixIndex


@pytest.fixture(scope="module")
def vllm_hash():
    from vllm.utils.hashing import sha256
    from vllm.v1.core import kv_cache_utils as kcu

    kcu.init_none_hash(sha256)
    return kcu, sha256


class TestHashingMatchesVllm:
    @pytest.mark.parametrize("salt", [None, "tenant-a"])
    @pytest.mark.parametrize("block_size", [16, 128])
    def test_same_hashes(self, vllm_hash, salt, block_size):
        kcu, sha256 = vllm_hash
        rng = random.Random(block_size)
        tokens = [rng.randrange(49152) for _ in range(3 * block_size + 5)]
        ours = block_hashes(tokens, block_size, cache_salt=salt)
        assert len(ours) == 3 and ours[0] != none_hash()
        parent = None
        for i in range(3):
            extra = (("cache_salt", salt),) if (i == 0 and salt) else None
            parent = kcu.hash_block_tokens(sha256, parent, tokens[i * block_size : (i + 1) * block_size], extra)
            assert bytes(parent) == ours[i]

    def test_salt_isolates_tenants_and_chains(self):
        t = list(range(256))
        a, b = block_hashes(t, 128, "a"), block_hashes(t, 128, "b")
        assert not set(a) & set(b)  # every block differs, not only the first
        assert block_hashes(t, 128) == block_hashes(t + [1, 2, 3], 128)
        assert block_hashes(t, 128)[1] != block_hashes([9] + t[1:], 128)[1]
        assert short_key(2**70 + 5) == 5

    def test_short_key_equals_vllm_kv_event_int_hash(self):
        from vllm.v1.core.kv_cache_utils import maybe_convert_block_hash

        h = block_hashes(list(range(128)), 128)[0]
        published = maybe_convert_block_hash(h)  # what BlockStored carries (int hashes, vLLM default)
        assert isinstance(published, int) and short_key(h) == short_key(published)


class TestPrefixIndex:
    def test_longest_exact_prefix(self):
        idx = PrefixIndex()
        h = block_hashes(list(range(128 * 4)), 128)
        idx.add("A", h[:3])
        idx.add("B", h[:1] + h[2:4])  # holds blocks 0, 2, 3 but not 1
        assert idx.match(h, ["A", "B", "C"]) == {"A": 3, "B": 1, "C": 0}
        idx.remove("A", h[1:2])
        assert idx.match(h, ["A"]) == {"A": 1}
        idx.drop_endpoint("B")
        assert idx.match(h, ["A", "B"]) == {"A": 1, "B": 0}

    def test_lru_eviction_and_bit_reuse(self):
        idx = PrefixIndex(capacity_blocks=3)
        idx.add("A", [1, 2, 3])
        idx.match([1], ["A"])  # touch 1: 2 is now the oldest
        idx.add("A", [4])
        assert len(idx) == 3 and idx.evictions == 1
        assert idx.match([1], ["A"]) == {"A": 1} and idx.match([2], ["A"]) == {"A": 0}
        idx.drop_endpoint("A")
        idx.add("Z", [7])
        assert idx.match([7, 1], ["Z", "A"]) == {"Z": 1, "A": 0}

    def test_one_million_blocks(self):
        idx = PrefixIndex(capacity_blocks=1_000_000)
        t0 = time.perf_counter()
        for e in range(4):
            idx.add(f"e{e}", range(e * 300_000, e * 300_000 + 300_000))
        assert len(idx) == 1_000_000 and idx.evictions == 200_000
        hit = list(range(900_000, 900_100))
        assert idx.match(hit, ["e3", "e0"]) == {"e3": 100, "e0": 0}
        assert time.perf_counter() - t0 < 30  # a sanity bound, not a benchmark


def test_blocks_by_endpoint_follows_adds_removes_evictions_and_drops():
    idx = PrefixIndex(capacity_blocks=4)
    idx.add("A", [1, 2, 3, 3])  # a repeated hash is one block
    idx.add("B", [2, 3])
    assert idx.blocks_by_endpoint() == {"A": 3, "B": 2}
    idx.remove("A", [3, 3, 9])  # twice, and one A never held: one block less
    assert idx.blocks_by_endpoint() == {"A": 2, "B": 2}
    idx.add("B", [4, 5])  # 5 entries > capacity 4: the LRU entry (1, A's) is evicted
    assert idx.evictions == 1 and idx.blocks_by_endpoint() == {"A": 1, "B": 4}
    idx.drop_endpoint("B")
    assert idx.blocks_by_endpoint() == {"A": 1} and idx.endpoints() == {"A"}
    assert sum(idx.blocks_by_endpoint().values()) <= len(idx)
