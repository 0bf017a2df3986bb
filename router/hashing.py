"""Block hashes computed exactly as vLLM's prefix cache does (``prefix_caching_hash_algo="sha256"``).

vLLM hashes each FULL block of ``block_size`` prompt tokens as
``sha256(pickle((parent_hash, tuple(block_tokens), extra_keys)))`` with the first block's parent
being ``NONE_HASH = sha256(pickle(seed))`` (seed ``PYTHONHASHSEED`` if set, else
``"vllm-none-hash"``), and ``extra_keys = (("cache_salt", salt),)`` on the first block of a salted
request (tenant isolation), else ``None``. Matching the engines' hashes lets the router key its
prefix index on the same ids the engines publish in KV cache events. Pure: stdlib only.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Sequence

DEFAULT_SEED = "vllm-none-hash"


def _sha256(obj) -> bytes:
    return hashlib.sha256(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)).digest()


def none_hash(seed: str | None = None) -> bytes:
    return _sha256(seed if seed is not None else os.environ.get("PYTHONHASHSEED", DEFAULT_SEED))


def block_hashes(
    token_ids: Sequence[int], block_size: int, cache_salt: str | None = None, seed: str | None = None
) -> list[bytes]:
    """Chained hashes of the full blocks of ``token_ids`` (a trailing partial block has none)."""
    parent = none_hash(seed)
    out = []
    for i in range(len(token_ids) // block_size):
        extra = (("cache_salt", cache_salt),) if (i == 0 and cache_salt) else None
        parent = _sha256((parent, tuple(token_ids[i * block_size : (i + 1) * block_size]), extra))
        out.append(parent)
    return out


_MASK64 = (1 << 64) - 1


def short_key(block_hash: bytes | int) -> int:
    """A compact 64-bit key for the prefix index, equal to the int vLLM publishes in KV cache events
    for the same block (``VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES``, default on: the hash's low 64 bits,
    big-endian), so router-computed and engine-published hashes key the same entry."""
    if isinstance(block_hash, int):
        return block_hash & _MASK64
    return int.from_bytes(block_hash, "big") & _MASK64


def block_keys(
    token_ids: Sequence[int], block_size: int, cache_salt: str | None = None, seed: str | None = None
) -> tuple[int, ...]:
    """``short_key`` of each full block's hash: what the router carries per request and the prefix
    index stores (the same ints engines publish in KV cache events), computed once at ingress."""
    return tuple(short_key(h) for h in block_hashes(token_ids, block_size, cache_salt, seed))
