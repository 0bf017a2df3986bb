"""The pure parts of ``pdserve profile`` (workers/profiler.py, serve/profile_cmd.py): grids, medians,
naming, KV arithmetic, the decode-step reading of token times."""

import pytest

from capacity.profile import ProfileKey
from serve.config import DEFAULT_CONFIG, ClusterConfig
from serve.profile_cmd import selected_pools
from workers.config import PoolConfig
from workers.profiler import (
    FULL_GRID,
    QUICK_GRID,
    ProfileGrid,
    cpu_isa,
    decode_max_tokens,
    device_type,
    distinct_prompts,
    dtype_bytes,
    group_pools,
    kv_bytes_per_token,
    median_points,
    profile_key,
    steady_step_s,
)

SMOLLM2 = {
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "hidden_size": 576,
    "head_dim": 64,
    "vocab_size": 49152,
}
AMX = frozenset({"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})


def pool(name="p", role="prefill", cores="0", **engine):
    return PoolConfig.model_validate(
        {"name": name, "role": role, "device": {"kind": "cpu", "cpu_cores": cores}, "engine": engine}
    )


def test_grid_fits_the_engine_limits():
    g = FULL_GRID.fitted(max_model_len=2048, max_num_seqs=16)
    assert g.prefill_tokens == (32, 64, 128, 256, 512, 1024, 2047)
    assert g.decode_batches == (1, 2, 4, 8, 16)
    assert g.decode_contexts == (128, 512, 1024)
    short = FULL_GRID.fitted(max_model_len=600, max_num_seqs=64)
    assert max(short.prefill_tokens) == 599
    assert max(short.decode_contexts) == 600 - FULL_GRID.decode_steps - 64
    # the KV cache bounds the batch: 10,000 tokens hold 9 sequences of 1024 + slack (80)
    small_kv = FULL_GRID.fitted(max_model_len=2048, max_num_seqs=64, kv_capacity_tokens=10_000)
    assert small_kv.decode_batches == (1, 2, 4, 8, 9)


def test_quick_grid_is_smaller_but_still_a_grid():
    assert len(QUICK_GRID.prefill_tokens) < len(FULL_GRID.prefill_tokens)
    assert len(QUICK_GRID.decode_batches) >= 2 and len(QUICK_GRID.decode_contexts) >= 2
    assert isinstance(QUICK_GRID, ProfileGrid)


def test_median_points_one_per_x_ascending():
    pts = median_points([(512, 3.0), (32, 1.0), (512, 1.0), (512, 2.0), (32, 5.0)])
    assert pts == ((32, 3.0), (512, 2.0))


def test_kv_bytes_per_token_of_smollm2():
    assert kv_bytes_per_token(SMOLLM2, "bfloat16") == 30 * 2 * 3 * 64 * 2 == 23040
    assert kv_bytes_per_token(SMOLLM2, "float32") == 46080


def test_kv_bytes_per_token_derives_head_dim_and_kv_heads():
    cfg = {"num_hidden_layers": 2, "num_attention_heads": 8, "hidden_size": 512}
    assert kv_bytes_per_token(cfg, "float16") == 2 * 2 * 8 * 64 * 2
    with pytest.raises(ValueError, match="unknown dtype"):
        dtype_bytes("int3")
    assert dtype_bytes("torch.bfloat16") == 2


def test_cpu_isa_and_cores():
    assert cpu_isa(AMX) == "avx512-amx"
    assert cpu_isa({"avx2", "avx512f"}) == "avx512"
    assert cpu_isa({"avx2", "fma"}) == "avx2"
    assert cpu_isa(set()) == "generic"


def test_device_type_and_key():
    assert device_type(pool(cores="0-1"), AMX, 2) == "cpu-2core-avx512-amx"
    assert device_type(pool(cores="0,2,4-5"), AMX, 8) == "cpu-4core-avx512-amx"
    assert device_type(pool(cores="auto"), AMX, 3) == "cpu-3core-avx512-amx"  # every core it may run on
    gpu = PoolConfig.model_validate({"name": "g", "role": "decode", "device": {"kind": "gpu", "gpu_type": "H100"}})
    assert device_type(gpu, AMX, 2) == "H100"
    key = profile_key("SmolLM2-135M-Instruct", pool(cores="1"), "bfloat16", AMX, 2)
    assert key == ProfileKey("SmolLM2-135M-Instruct", "cpu-1core-avx512-amx", 1, 1, "bfloat16")


def test_default_config_is_one_engine_type_measured_on_both_pools():
    cfg = ClusterConfig.from_yaml(DEFAULT_CONFIG)
    groups = group_pools(cfg.pools, lambda p: profile_key(cfg.model.name, p, "bfloat16", AMX, 2))
    assert len(groups) == 1
    g = groups[0]
    assert (g.prefill_pool.name, g.decode_pool.name) == ("prefill", "decode")
    assert g.measures_handoff
    assert [p.name for p in g.measuring_pools] == ["prefill", "decode"]


def test_pools_of_different_devices_are_separate_engine_types():
    pools = [pool("a", "prefill", "0-1"), pool("b", "decode", "2"), pool("c", "decode", "3")]
    groups = group_pools(pools, lambda p: profile_key("m", p, "bfloat16", AMX, 4))
    assert [[p.name for p in g.pools] for g in groups] == [["a"], ["b", "c"]]
    assert not groups[0].measures_handoff and groups[0].decode_pool.name == "a"
    assert [p.name for p in groups[0].measuring_pools] == ["a"]
    assert groups[1].prefill_pool.name == "b"  # no prefill pool: the first measures prefill


def test_distinct_prompts_never_share_a_first_block():
    prompts = distinct_prompts(32, 256, vocab_size=49152, seed=3)
    assert len(prompts) == 32 and all(len(p) == 256 for p in prompts)
    assert len({p[:32] for p in prompts}) == 32
    assert all(100 <= t < 49151 for p in prompts for t in p)
    assert distinct_prompts(32, 256, 49152, seed=3) == prompts
    assert distinct_prompts(32, 256, 49152, seed=4) != prompts


def test_steady_step_reads_only_the_window_where_the_whole_batch_decodes():
    # request 0 starts at 0 and decodes every 0.05 s alone; from 1.0 both decode every 0.1 s;
    # request 0 ends at 2.0, request 1 runs on alone at 0.05 s steps
    r0 = [i * 0.05 for i in range(20)] + [1.0 + i * 0.1 for i in range(11)]
    r1 = [1.0 + i * 0.1 for i in range(11)] + [2.0 + i * 0.05 for i in range(1, 20)]
    assert steady_step_s([r0, r1]) == pytest.approx(0.1)


def test_steady_step_needs_a_shared_window():
    with pytest.raises(ValueError, match="decode_steps"):
        steady_step_s([[0.0, 0.1], [0.5, 0.6]])


def test_decode_max_tokens_covers_the_batch_prefill():
    assert decode_max_tokens(1, 128, 16, 4096) == 16 + 1 + 2
    assert decode_max_tokens(32, 1024, 16, 4096) == 16 + 8 + 2


def test_selected_pools():
    cfg = ClusterConfig.from_yaml(DEFAULT_CONFIG)
    assert [p.name for p in selected_pools(cfg, None)] == ["prefill", "decode"]
    assert [p.name for p in selected_pools(cfg, "decode")] == ["decode"]
    with pytest.raises(ValueError, match="nope"):
        selected_pools(cfg, "decode,nope")
