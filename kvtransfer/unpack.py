"""SlabUnpacker: decode side, received slabs in the pool -> the request's blocks in the paged caches.

A sender with our block size: each received block lands whole in the request's local block. Another
block size (e.g. a block-16 GPU prefill, a block-128 CPU decode): tokens go one by one through the
token-major view. Torch only; codecs of foreign block sizes or groups are built once and cached.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import torch

from kvtransfer.codec import SlabCodec
from kvtransfer.metadata import RecvJob
from kvtransfer.slab import SlabSpec
from kvtransfer.wire import SlabDesc, SlabHandoff


class SlabUnpacker:
    def __init__(
        self,
        spec: SlabSpec,
        layers: Sequence[torch.Tensor],
        pool: torch.Tensor,
        codecs: Mapping[str, SlabCodec],
        group: int,
    ):
        self.spec, self.layers, self.pool = spec, layers, pool
        self._codecs, self._group = codecs, group
        self._foreign_codecs: dict[tuple[int, str, int], SlabCodec] = {}

    def codec_for(self, h: SlabHandoff) -> SlabCodec:
        """The codec of the sender's block size, compression and group (cached)."""
        if h.block_size == self.spec.block_size and h.group == self._group:
            return self._codecs[h.compression]
        key = (h.block_size, h.compression, h.group)
        codec = self._foreign_codecs.get(key)
        if codec is None:
            spec = dataclasses.replace(self.spec, block_size=h.block_size)
            codec = self._foreign_codecs[key] = SlabCodec(spec, self.layers[0].dtype, h.compression, h.group)
        return codec

    def unpack(self, job: RecvJob, slabs: Sequence[SlabDesc]) -> None:
        """Scatter ``slabs`` (back to back in the pool from ``job.offset``) into ``job.block_ids``."""
        if job.handoff.block_size == self.spec.block_size:
            self._scatter_blocks(job, slabs)
        else:
            self._scatter_tokens(job, slabs)

    def _scatter_blocks(self, job: RecvJob, slabs: Sequence[SlabDesc]) -> None:
        codec, pos = self.codec_for(job.handoff), job.offset
        for s in slabs:
            raw = codec.decode(self.pool[pos : pos + s.nbytes], s.num_blocks)
            pos += s.nbytes
            skip = max(0, job.first_block - s.first_block)
            local = job.block_ids[s.first_block + skip : s.first_block + s.num_blocks]
            if local:
                codec.scatter(raw[:, skip : skip + len(local)], self.layers, local)

    def _scatter_tokens(self, job: RecvJob, slabs: Sequence[SlabDesc]) -> None:
        """Write the tokens ``[first_token, end_token)`` one by one into the local block table."""
        h = job.handoff
        codec, pos, bs = self.codec_for(h), job.offset, h.block_size
        for s in slabs:
            tm = codec.to_token_major(codec.decode(self.pool[pos : pos + s.nbytes], s.num_blocks))
            pos += s.nbytes
            start = max(job.first_token, s.first_block * bs)
            end = min(job.end_token, (s.first_block + s.num_blocks) * bs)
            if end > start:
                codec.scatter_tokens(
                    tm,
                    end - start,
                    self.layers,
                    job.block_ids,
                    first_token=start,
                    block_size=self.spec.block_size,
                    skip=start - s.first_block * bs,
                )
