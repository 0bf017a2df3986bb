"""Gather paged KV blocks into a contiguous slab and scatter a slab back (torch; no vLLM, no NIXL).

Paged side: one tensor per layer, viewed as ``[num_blocks, num_kv_heads, block_size, content]``
(vLLM's LBHNC cache layout per layer; ``content`` = K and V packed, 2 x head_dim).
Slab side (the wire format before compression): ``[num_layers, num_kv_heads, num_tokens, content]``,
token-major inside each head, so a receiver with a different block size (a heterogeneous decode pool)
scatters it into its own block table. Compression (``int8``/``int4``) encodes that tensor as a whole
with :class:`kvtransfer.quant.GroupQuant`.

Work is vectorised per layer (``index_select`` / ``index_copy_`` over block ids); the only Python
loop is over layers.
"""

from __future__ import annotations

from typing import Literal, Sequence

import torch

from kvtransfer.quant import GroupQuant
from kvtransfer.slab import Slab, SlabSpec

Compression = Literal["none", "int8", "int4"]


def _quant(compression: Compression, group: int) -> GroupQuant | None:
    if compression == "none":
        return None
    return GroupQuant(bits=4 if compression == "int4" else 8, group=group)


class SlabCodec:
    def __init__(self, spec: SlabSpec, dtype: torch.dtype, compression: Compression = "none", group: int = 32):
        if compression not in ("none", "int8", "int4"):
            raise ValueError(f"unknown compression {compression!r}")
        self.spec, self.dtype, self.compression = spec, dtype, compression
        self.quant = _quant(compression, group)

    def slab_shape(self, num_tokens: int) -> tuple[int, int, int, int]:
        s = self.spec
        return (s.num_layers, s.num_kv_heads, num_tokens, s.content_dim)

    def raw_nbytes(self, num_tokens: int) -> int:
        return num_tokens * self.spec.kv_bytes_per_token

    def encoded_nbytes(self, num_tokens: int) -> int:
        """Bytes on the wire for a slab of ``num_tokens`` tokens."""
        if self.quant is None:
            return self.raw_nbytes(num_tokens)
        n = num_tokens * self.spec.num_layers * self.spec.num_kv_heads * self.spec.content_dim
        return self.quant.encoded_nbytes(n)

    # paged <-> slab tensor ---------------------------------------------------------------------
    def gather(self, layers: Sequence[torch.Tensor], slab: Slab, out: torch.Tensor | None = None) -> torch.Tensor:
        """Copy the slab's tokens out of the paged caches into ``[L, H, T, C]``."""
        s = self.spec
        out = out if out is not None else torch.empty(self.slab_shape(slab.num_tokens), dtype=self.dtype)
        ids = torch.tensor(slab.block_ids, dtype=torch.long)
        for li, cache in enumerate(layers):
            blocks = cache.index_select(0, ids)                     # [k, H, bs, C]
            tokens = blocks.permute(1, 0, 2, 3).reshape(s.num_kv_heads, -1, s.content_dim)
            out[li].copy_(tokens[:, :slab.num_tokens])
        return out

    def scatter(self, kv: torch.Tensor, layers: Sequence[torch.Tensor], block_ids: Sequence[int],
                block_size: int | None = None) -> None:
        """Write ``[L, H, T, C]`` into the paged caches at ``block_ids`` (token order) of the receiver,
        whose block size may differ from the sender's. A partial last block keeps its other slots."""
        num_tokens = kv.shape[2]
        bs = block_size or self.spec.block_size
        full, rem = divmod(num_tokens, bs)
        if len(block_ids) < full + (1 if rem else 0):
            raise ValueError(f"{num_tokens} tokens need {full + bool(rem)} blocks of {bs}, got {len(block_ids)}")
        full_ids = torch.tensor(list(block_ids[:full]), dtype=torch.long)
        h, c = kv.shape[1], kv.shape[3]
        for li, cache in enumerate(layers):
            src = kv[li].to(cache.dtype)
            if full:
                blocks = src[:, :full * bs].reshape(h, full, bs, c).permute(1, 0, 2, 3)
                cache.index_copy_(0, full_ids, blocks)
            if rem:
                cache[block_ids[full], :, :rem].copy_(src[:, full * bs:])

    # wire encoding -------------------------------------------------------------------------------
    def encode(self, kv: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Slab tensor -> flat uint8 wire bytes (a zero-copy view when uncompressed and ``out`` is None)."""
        if self.quant is not None:
            return self.quant.encode(kv, out=out)
        flat = kv.contiguous().reshape(-1).view(torch.uint8)
        if out is None:
            return flat
        out.copy_(flat)
        return out

    def decode(self, buf: torch.Tensor, num_tokens: int) -> torch.Tensor:
        """Wire bytes -> slab tensor ``[L, H, T, C]`` in the codec's dtype."""
        shape = self.slab_shape(num_tokens)
        if self.quant is not None:
            return self.quant.decode(buf, shape, self.dtype)
        return buf[:self.raw_nbytes(num_tokens)].view(self.dtype).reshape(shape)

    def pack(self, layers: Sequence[torch.Tensor], slab: Slab, out: torch.Tensor | None = None) -> torch.Tensor:
        """Paged caches -> wire bytes for one slab (gather, then compress if configured)."""
        if self.quant is None and out is not None:
            view = out[:self.raw_nbytes(slab.num_tokens)].view(self.dtype).reshape(self.slab_shape(slab.num_tokens))
            self.gather(layers, slab, out=view)
            return out[:self.raw_nbytes(slab.num_tokens)]
        return self.encode(self.gather(layers, slab), out=out)

    def unpack(self, buf: torch.Tensor, num_tokens: int, layers: Sequence[torch.Tensor],
               block_ids: Sequence[int], block_size: int | None = None) -> None:
        """Wire bytes -> paged caches of the receiver (decompress, then scatter)."""
        self.scatter(self.decode(buf, num_tokens), layers, block_ids, block_size)
