"""Gather paged KV blocks into a slab and scatter a slab back (torch; no vLLM, no NIXL).

Layout verified against vLLM 0.32's CPU attention backend (``cpu_attn_reshape_and_cache`` writes
K transposed; see tests/unit/test_kvtransfer.py::TestSlabCodec and the worker's start-up check).
One cache tensor per layer, ``[num_blocks, H, block_size, 2*D]`` as allocated, whose interior for
one (block, head) is NOT token-major K|V::

    paged layer tensor (LBHNC), one block b, one head h:
    +---------------------------------------+---------------------------------------+
    | K^T: D rows x block_size slots        | V: block_size slots x D               |
    |  (channel-major, "k_transposed")      |  (token-major)                        |
    +---------------------------------------+---------------------------------------+

A slab is ``ceil(slab_tokens / block_size)`` of a request's blocks across ALL layers, moved as ONE
transfer descriptor. Uncompressed wire format = the blocks' raw bytes, layer-major::

    slab (none):  [ layer 0: blk0 [H x (K^T | V)] blk1 ... blk{k-1} ][ layer 1: ... ] ... [ layer L-1 ]
    slab (int8/int4):  GroupQuant(token-major view [L, k, H, 2, block_size, D] @ Hadamard(D))
                       = codes | fp16 scales | zero points

Packing is one ``index_select(out=...)`` per layer straight into registered pool memory (no
intermediate). Quantization groups run along head_dim (K is transposed to token-major first), after
an orthonormal Hadamard rotation of each head vector that the receiver undoes. A
receiver with the same block size copies whole blocks back (``index_copy_``); one with another
block size goes through the token-major view and a slot mapping (``scatter_tokens``). The last
block of a request travels whole: its slots past the prompt hold stale data that the receiver
overwrites when it recomputes the last prompt token and decodes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kvtransfer.quant import GroupQuant
from kvtransfer.slab import SlabSpec
from kvtransfer.wire import COMPRESSIONS


def hadamard(n: int) -> torch.Tensor:
    """Orthonormal Sylvester-Hadamard matrix of size ``n`` (a power of two); symmetric, H @ H = I."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"hadamard size {n} is not a power of two")
    h = torch.ones(1, 1)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / n**0.5


def _quant(compression: str, group: int) -> GroupQuant | None:
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}")
    if compression == "none":
        return None
    return GroupQuant(bits=4 if compression == "int4" else 8, group=group)


class SlabCodec:
    """Paged blocks <-> wire bytes for one model geometry (``spec``) and one compression."""

    def __init__(
        self, spec: SlabSpec, dtype: torch.dtype, compression: str = "none", group: int = 32, k_transposed: bool = True
    ):
        self.spec, self.dtype, self.compression = spec, dtype, compression
        self.quant = _quant(compression, group)
        self.k_transposed = k_transposed
        # quantized modes rotate each head vector by a Hadamard matrix first: K has outlier channels
        # that would set the scale of every group they fall in; the rotation spreads them (measured
        # on SmolLM2 int4: first-32-token greedy agreement 2/5 prompts -> 4/5)
        d = spec.head_dim
        self._rotation = hadamard(d) if self.quant is not None and d & (d - 1) == 0 else None

    # sizes ---------------------------------------------------------------------------------------
    @property
    def block_elems(self) -> int:
        """Elements of one block of one layer (all heads, K and V)."""
        s = self.spec
        return s.num_kv_heads * s.block_size * s.content_dim

    def raw_nbytes(self, num_blocks: int) -> int:
        return num_blocks * self.spec.num_layers * self.block_elems * self.spec.dtype_bytes

    def wire_nbytes(self, num_blocks: int) -> int:
        """Bytes on the wire for a slab of ``num_blocks`` blocks (all layers)."""
        if self.quant is None:
            return self.raw_nbytes(num_blocks)
        return self.quant.encoded_nbytes(num_blocks * self.spec.num_layers * self.block_elems)

    # paged <-> raw slab tensor ---------------------------------------------------------------------
    def _layer_view(self, cache: torch.Tensor) -> torch.Tensor:
        return cache.view(cache.shape[0], self.block_elems)

    def gather(
        self, layers: Sequence[torch.Tensor], block_ids: Sequence[int], out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Raw slab tensor ``[L, k, block_elems]`` (paged interior kept) of ``block_ids``."""
        ids = torch.tensor(list(block_ids), dtype=torch.long)
        out = out if out is not None else torch.empty((len(layers), len(ids), self.block_elems), dtype=self.dtype)
        for li, cache in enumerate(layers):
            torch.index_select(self._layer_view(cache), 0, ids, out=out[li])
        return out

    def scatter(self, raw: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int]) -> None:
        """Inverse of :meth:`gather` for a receiver with the same block size and layout."""
        ids = torch.tensor(list(block_ids), dtype=torch.long)
        if raw.shape[1] != len(ids):
            raise ValueError(f"slab has {raw.shape[1]} blocks, got {len(ids)} destination blocks")
        for li, cache in enumerate(layers):
            self._layer_view(cache).index_copy_(0, ids, raw[li].to(cache.dtype))

    # token-major view: [L, k, H, 2, block_size, D] -------------------------------------------------
    def to_token_major(self, raw: torch.Tensor) -> torch.Tensor:
        s = self.spec
        x = raw.reshape(raw.shape[0], raw.shape[1], s.num_kv_heads, 2, s.block_size * s.head_dim)
        k = x[:, :, :, 0].reshape(
            *x.shape[:3], *((s.head_dim, s.block_size) if self.k_transposed else (s.block_size, s.head_dim))
        )
        v = x[:, :, :, 1].reshape(*x.shape[:3], s.block_size, s.head_dim)
        if self.k_transposed:
            k = k.transpose(-1, -2)
        return torch.stack((k, v), dim=3)

    def from_token_major(self, tm: torch.Tensor) -> torch.Tensor:
        k, v = tm[:, :, :, 0], tm[:, :, :, 1]
        if self.k_transposed:
            k = k.transpose(-1, -2)
        out = torch.stack((k.reshape(*k.shape[:3], -1), v.reshape(*v.shape[:3], -1)), dim=3)
        return out.reshape(tm.shape[0], tm.shape[1], self.block_elems)

    def scatter_tokens(
        self,
        tm: torch.Tensor,
        num_tokens: int,
        layers: Sequence[torch.Tensor],
        block_table: Sequence[int],
        first_token: int,
        block_size: int,
        skip: int = 0,
    ) -> None:
        """Write tokens ``skip .. skip + num_tokens`` of a token-major slab ``tm`` to absolute positions
        ``first_token..`` of a receiver whose block size is ``block_size`` (any size); ``block_table``
        is the receiver's table of the request from position 0."""
        s = self.spec
        tok = tm.permute(0, 1, 4, 2, 3, 5).reshape(tm.shape[0], -1, s.num_kv_heads, 2, s.head_dim)
        tok = tok[:, skip : skip + num_tokens]
        pos = torch.arange(first_token, first_token + num_tokens)
        table = torch.tensor(list(block_table), dtype=torch.long)
        blk, off = table[pos // block_size], pos % block_size
        for li, cache in enumerate(layers):
            view = cache.view(cache.shape[0], s.num_kv_heads, 2, block_size * s.head_dim)
            k_cache = view[:, :, 0].view(
                cache.shape[0],
                s.num_kv_heads,
                *((s.head_dim, block_size) if self.k_transposed else (block_size, s.head_dim)),
            )
            v_cache = view[:, :, 1].view(cache.shape[0], s.num_kv_heads, block_size, s.head_dim)
            src = tok[li].to(cache.dtype)  # [T, H, 2, D]
            if self.k_transposed:
                k_cache[blk, :, :, off] = src[:, :, 0]
            else:
                k_cache[blk, :, off] = src[:, :, 0]
            v_cache[blk, :, off] = src[:, :, 1]

    # wire ----------------------------------------------------------------------------------------
    def pack(self, layers: Sequence[torch.Tensor], block_ids: Sequence[int], out: torch.Tensor) -> torch.Tensor:
        """Paged blocks -> wire bytes written into ``out`` (uint8, at least ``wire_nbytes``);
        returns the used prefix of ``out``."""
        n = self.wire_nbytes(len(block_ids))
        buf = out[:n]
        if self.quant is None:
            raw = buf.view(self.dtype).view(len(layers), len(block_ids), self.block_elems)
            self.gather(layers, block_ids, out=raw)
        else:
            tm = self.to_token_major(self.gather(layers, block_ids))
            if self._rotation is not None:
                tm = tm.float() @ self._rotation
            self.quant.encode(tm, out=buf)
        return buf

    def decode(self, buf: torch.Tensor, num_blocks: int) -> torch.Tensor:
        """Wire bytes -> raw slab tensor ``[L, k, block_elems]`` (a view when uncompressed)."""
        shape = (self.spec.num_layers, num_blocks, self.block_elems)
        if self.quant is None:
            return buf[: self.raw_nbytes(num_blocks)].view(self.dtype).view(shape)
        s = self.spec
        tm_shape = (s.num_layers, num_blocks, s.num_kv_heads, 2, s.block_size, s.head_dim)
        tm = self.quant.decode(buf[: self.wire_nbytes(num_blocks)], tm_shape, torch.float32)
        if self._rotation is not None:
            tm = tm @ self._rotation.T
        return self.from_token_major(tm.to(self.dtype))

    def unpack(self, buf: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int]) -> None:
        """Wire bytes of ``len(block_ids)`` sender blocks -> the receiver's blocks (same block size)."""
        self.scatter(self.decode(buf, len(block_ids)), layers, block_ids)
