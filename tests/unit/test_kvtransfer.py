"""Pure parts of kvtransfer/: slab planning, pool sizing, group quantization, gather/scatter codec."""

import pytest
import torch

from kvtransfer.codec import SlabCodec, hadamard
from kvtransfer.quant import GroupQuant
from kvtransfer.slab import MiB, SlabSpec, plan_slabs, pool_nbytes
from kvtransfer.wire import wire_byte_ratio

# SmolLM2-135M: 30 layers, 3 KV heads, head_dim 64
SMOL = {"num_layers": 30, "num_kv_heads": 3, "head_dim": 64}


class TestPlanning:
    def test_issue_example_7500_tokens_block_16(self):
        spec = SlabSpec(**SMOL, block_size=16, dtype_bytes=2)
        plan = plan_slabs(list(range(1000, 1469)), 7500, spec)
        assert spec.blocks_per_slab == 8 and plan.num_descriptors == 59
        assert all(len(s.block_ids) == 8 and s.num_tokens == 128 for s in plan.slabs[:-1])
        last = plan.slabs[-1]
        assert last.block_ids == (1464, 1465, 1466, 1467, 1468) and last.num_tokens == 7500 - 58 * 128
        assert plan.num_tokens == 7500
        assert [s.token_start for s in plan.slabs[:3]] == [0, 128, 256]

    @pytest.mark.parametrize(
        "block_size,tokens,slabs", [(128, 128, 1), (128, 129, 2), (32, 512, 4), (32, 1, 1), (256, 600, 3), (16, 0, 0)]
    )
    def test_slab_counts(self, block_size, tokens, slabs):
        spec = SlabSpec(**SMOL, block_size=block_size, dtype_bytes=4)
        plan = plan_slabs(list(range(64)), tokens, spec)
        assert plan.num_descriptors == slabs and plan.num_tokens == tokens
        assert all(s.num_tokens >= 128 for s in plan.slabs[:-1])

    def test_extra_blocks_ignored_and_too_few_rejected(self):
        spec = SlabSpec(**SMOL, block_size=32, dtype_bytes=2)
        assert plan_slabs([5, 6, 7, 8, 9, 10], 40, spec).slabs[0].block_ids == (5, 6)
        with pytest.raises(ValueError):
            plan_slabs([1], 40, spec)

    def test_kv_bytes_and_pool_size(self):
        spec = SlabSpec(**SMOL, block_size=128, dtype_bytes=2)
        assert spec.kv_bytes_per_token == 2 * 30 * 3 * 64 * 2 == 23040
        assert pool_nbytes(spec, 2048) == 256 * MiB  # 45 MiB -> one 256 MiB unit
        assert pool_nbytes(spec, 20_000) == 512 * MiB  # 439 MiB -> 512
        assert pool_nbytes(spec, 20_000, wire_bytes_per_token=100, round_to=MiB) == 2 * MiB


class TestGroupQuant:
    @pytest.mark.parametrize("bits", [4, 8])
    def test_round_trip_within_bound(self, bits):
        torch.manual_seed(0)
        q = GroupQuant(bits=bits, group=32)
        x = torch.randn(4, 3, 50, 128) * torch.linspace(0.01, 20, 128)  # varied ranges per group
        buf = q.encode(x)
        assert buf.dtype == torch.uint8 and buf.numel() == q.encoded_nbytes(x.numel())
        y = q.decode(buf, tuple(x.shape), torch.float32)
        err = (x - y).abs()
        assert torch.all(err <= q.error_bound(x)), float((err - q.error_bound(x)).max())

    def test_sizes(self):
        n = 30 * 3 * 128 * 128
        assert GroupQuant(4, 32).encoded_nbytes(n) == n // 2 + n // 32 * 2 + n // 64
        assert GroupQuant(4, 32).encoded_nbytes(n) / (n * 2) < 0.3  # vs bf16
        assert GroupQuant(8, 32).encoded_nbytes(n) == n + n // 32 * 3

    def test_constant_and_zero_groups(self):
        q = GroupQuant(4, 32)
        x = torch.cat([torch.zeros(32), torch.full((32,), 3.0), torch.full((32,), -2.5), torch.arange(32.0)])
        y = q.decode(q.encode(x), (128,), torch.float32)
        assert torch.all(y[:32] == 0)
        assert torch.allclose(y[32:96], x[32:96], rtol=2e-3)

    def test_bad_shapes(self):
        with pytest.raises(ValueError):
            GroupQuant(4, 32).encode(torch.zeros(48))
        with pytest.raises(ValueError):
            GroupQuant(3, 32)


def _paged(num_blocks, block_size, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(num_blocks, SMOL["num_kv_heads"], block_size, 2 * SMOL["head_dim"], generator=g).to(dtype)
        for _ in range(SMOL["num_layers"])
    ]


def _write_tokens(layers, kv, block_table, block_size):
    """Reference writer of vLLM CPU_ATTN's paged layout: token t's K/V ``kv[l, t] = [H, 2, D]`` go to
    block ``block_table[t // bs]``, slot ``t % bs``; K stored transposed ([D, bs]), V as [bs, D]."""
    h, d = SMOL["num_kv_heads"], SMOL["head_dim"]
    for li, cache in enumerate(layers):
        v5 = cache.view(cache.shape[0], h, 2, block_size * d)
        k_cache = v5[:, :, 0].view(cache.shape[0], h, d, block_size)
        v_cache = v5[:, :, 1].view(cache.shape[0], h, block_size, d)
        for t in range(kv.shape[1]):
            b, o = block_table[t // block_size], t % block_size
            k_cache[b, :, :, o] = kv[li, t, :, 0].to(cache.dtype)
            v_cache[b, :, o] = kv[li, t, :, 1].to(cache.dtype)


def _read_tokens(layers, num_tokens, block_table, block_size):
    h, d = SMOL["num_kv_heads"], SMOL["head_dim"]
    out = torch.empty(len(layers), num_tokens, h, 2, d)
    for li, cache in enumerate(layers):
        v5 = cache.view(cache.shape[0], h, 2, block_size * d)
        k_cache = v5[:, :, 0].view(cache.shape[0], h, d, block_size)
        v_cache = v5[:, :, 1].view(cache.shape[0], h, block_size, d)
        for t in range(num_tokens):
            b, o = block_table[t // block_size], t % block_size
            out[li, t, :, 0] = k_cache[b, :, :, o].float()
            out[li, t, :, 1] = v_cache[b, :, o].float()
    return out


class TestCpuAttnLayout:
    """The codec's idea of the paged layout is vLLM's: checked against the CPU backend's own writer."""

    @pytest.mark.parametrize("block_size", [32, 128])
    def test_reference_writer_matches_vllm_cpu_attn(self, block_size):
        from vllm import _custom_ops as ops
        from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

        h, d, nb, tokens = 3, 64, 4, block_size + 17
        isa = _get_attn_isa(torch.float32, block_size, d)
        ours = torch.zeros(nb, h, block_size, 2 * d)
        theirs = torch.zeros_like(ours)
        kv = torch.randn(1, tokens, h, 2, d)
        _write_tokens([ours], kv, [2, 0], block_size)
        k_cache, v_cache = theirs.view(nb, h, 2 * block_size, d).chunk(2, dim=2)
        slots = torch.tensor([2 * block_size + t if t < block_size else t - block_size for t in range(tokens)])
        ops.cpu_attn_reshape_and_cache(
            kv[0, :, :, 0].contiguous(), kv[0, :, :, 1].contiguous(), k_cache, v_cache, slots, isa
        )
        assert torch.equal(ours, theirs)


class TestSlabCodec:
    @pytest.mark.parametrize("compression", ["none", "int8", "int4"])
    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("group", [16, 32])
    def test_wire_byte_ratio_matches_the_codec(self, compression, dtype, group):
        """The pure ratio the simulator uses (kvtransfer/wire.py) is the real codec's wire/raw bytes."""
        spec = SlabSpec(**SMOL, block_size=128, dtype_bytes=torch.finfo(dtype).bits // 8)
        codec = SlabCodec(spec, dtype, compression, group=group)
        ratio = codec.wire_nbytes(4) / codec.raw_nbytes(4)
        assert wire_byte_ratio(compression, spec.dtype_bytes, group) == pytest.approx(ratio, rel=1e-12)

    @pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
    @pytest.mark.parametrize("block_size", [32, 128])
    def test_none_round_trip_is_bit_exact(self, dtype, block_size):
        spec = SlabSpec(**SMOL, block_size=block_size, dtype_bytes=torch.finfo(dtype).bits // 8)
        codec = SlabCodec(spec, dtype)
        src = _paged(24, block_size, dtype)
        dst = [torch.zeros_like(t) for t in src]
        src_ids = [7, 3, 11, 20, 1, 9, 14, 2, 5, 17]
        dst_ids = [12, 4, 0, 19, 8, 22, 6, 15, 10, 13]
        tokens = 9 * block_size + block_size // 2  # a partial last block
        plan = plan_slabs(src_ids, tokens, spec)
        pool = torch.empty(codec.wire_nbytes(spec.blocks_per_slab), dtype=torch.uint8)
        for slab in plan.slabs:
            wire = codec.pack(src, slab.block_ids, out=pool)
            assert wire.numel() == codec.wire_nbytes(len(slab.block_ids)) == codec.raw_nbytes(len(slab.block_ids))
            first = slab.token_start // block_size
            codec.unpack(wire, dst, dst_ids[first : first + len(slab.block_ids)])
        for s, d in zip(src, dst):
            for a, b in zip(src_ids, dst_ids):
                assert torch.equal(s[a], d[b])  # whole blocks, bit for bit
        untouched = sorted(set(range(24)) - set(dst_ids))
        assert all(torch.all(d[untouched] == 0) for d in dst)

    def test_token_major_view_is_the_tokens(self):
        spec = SlabSpec(**SMOL, block_size=32, dtype_bytes=4)
        codec = SlabCodec(spec, torch.float32)
        layers = [torch.zeros(6, 3, 32, 128) for _ in range(30)]
        kv = torch.randn(30, 64, 3, 2, 64)
        _write_tokens(layers, kv, [4, 1], 32)
        tm = codec.to_token_major(codec.gather(layers, [4, 1]))  # [L, k, H, 2, bs, D]
        assert torch.equal(tm.permute(0, 1, 4, 2, 3, 5).reshape(30, 64, 3, 2, 64), kv)
        assert torch.equal(codec.from_token_major(tm), codec.gather(layers, [4, 1]))

    def test_receiver_with_a_different_block_size(self):
        spec = SlabSpec(**SMOL, block_size=128, dtype_bytes=4)
        codec = SlabCodec(spec, torch.float32)
        src = _paged(4, 128, torch.float32)
        kv = torch.randn(30, 100, 3, 2, 64)
        _write_tokens(src, kv, [2], 128)
        dst = [torch.zeros(16, 3, 32, 128) for _ in range(30)]
        tm = codec.to_token_major(
            codec.decode(codec.pack(src, [2], torch.empty(codec.wire_nbytes(1), dtype=torch.uint8)), 1)
        )
        codec.scatter_tokens(tm, 100, dst, [5, 9, 1, 7], first_token=0, block_size=32)
        assert torch.equal(_read_tokens(dst, 100, [5, 9, 1, 7], 32), kv)

    def test_int4_wire_bytes_and_error(self):
        spec = SlabSpec(**SMOL, block_size=128, dtype_bytes=2)
        codec = SlabCodec(spec, torch.bfloat16, compression="int4")
        src = _paged(4, 128, torch.bfloat16, seed=1)
        dst = [torch.zeros_like(t) for t in src]
        wire = codec.pack(src, [3], torch.empty(codec.wire_nbytes(1), dtype=torch.uint8))
        assert wire.numel() == codec.wire_nbytes(1) <= 0.3 * codec.raw_nbytes(1)
        codec.unpack(wire, dst, [0])
        kv = codec.to_token_major(codec.gather(src, [3])).float()
        back = codec.to_token_major(codec.gather(dst, [0])).float()
        # quantization happens after an orthonormal rotation along head_dim: bound each head vector's
        # L2 error by the rotated domain's per-element bounds (+ bf16 rounding on the receiver)
        rot_bound = codec.quant.error_bound(kv @ hadamard(64)).norm(dim=-1)
        err = (kv - back).norm(dim=-1)
        assert torch.all(err <= rot_bound + kv.norm(dim=-1) * 2**-7 + 1e-4)

    def test_hadamard_is_orthonormal(self):
        h = hadamard(64)
        assert torch.allclose(h @ h.T, torch.eye(64), atol=1e-6)
        with pytest.raises(ValueError):
            hadamard(48)

    def test_unknown_compression(self):
        with pytest.raises(ValueError):
            SlabCodec(SlabSpec(**SMOL, block_size=32, dtype_bytes=2), torch.bfloat16, compression="zstd")


def test_bench_takes_nixl_handoff_as_xfer_duration_alone():
    """NIXL's xferDuration runs from the post to completion, post included: the bench's NixlConnector
    handoff is xferDuration alone (adding postDuration counted the post twice)."""
    from loadtests.kv.kv_bench import summarize

    def row(connector, **kw):
        base = {
            "connector": connector,
            "compression": "none",
            "mode": "pull",
            "prompt_tokens": 512,
            "warmup": False,
            "end_to_end_s": 1.0,
            "decode_request_s": 0.1,
            "descriptors": 4,
            "wire_bytes": 100,
            "raw_bytes": 100,
        }
        return {**base, **kw}

    rows = [
        row("nixl", transfer_s=0.010, post_s=0.010, connector_handoff_s=0.020),
        row("slab", pack_s=0.002, transfer_s=0.003, connector_handoff_s=0.008),
    ]
    s = summarize(rows, memcpy=10.0, sizes=[512])["by_size"]["512"]
    assert s["nixl-none"]["connector_handoff_p50_s"] == 0.010
    assert s["slab-none"]["connector_handoff_p50_s"] == 0.008
    assert abs(s["ratios"]["connector_handoff_p50_slab_over_nixl"] - 0.8) < 1e-9
