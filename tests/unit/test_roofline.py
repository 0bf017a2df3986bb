"""Roofline estimates (capacity/roofline.py) and the GPU table (capacity/hardware.yaml): the limits the
model is built on, checked against its own closed forms and the datasheet rows."""

import pytest

from capacity.hardware import load_hardware
from capacity.profile import ROOFLINE, EngineProfile
from capacity.roofline import (
    DECODE_BW_EFFICIENCY,
    DECODE_STEP_OVERHEAD_S,
    PREFILL_MFU,
    PREFILL_OVERHEAD_S,
    DoesNotFit,
    ModelSpec,
    Roofline,
    estimate_profile,
    load_model,
)

HW = load_hardware()
LLAMA8 = load_model("llama-3.1-8b")
REQUIRED = ("A100-40GB", "A100-80GB", "H100-SXM", "H100-PCIe", "L40S", "L4", "A10G", "T4", "V100-16GB", "RTX-4090")


def test_table_has_the_required_rows_with_sources():
    for name in REQUIRED:
        row = HW[name]
        assert row.dense_tflops > 0 and row.memory_bw_gbs > 0 and row.memory_gib > 0 and row.price_per_hour > 0
        assert "datasheet" in row.source.lower() or "whitepaper" in row.source.lower()
        assert row.price_source
    assert HW["H100-SXM"].dense_tflops > HW["A100-80GB"].dense_tflops > HW["L4"].dense_tflops
    with pytest.raises(KeyError, match="not in the hardware table"):
        HW["B9000"]


def test_from_hf_config_counts_parameters():
    assert load_model("bundled:smollm2").params == pytest.approx(134.5e6, rel=0.01)  # "135M"
    assert LLAMA8.params == pytest.approx(8.03e9, rel=0.01)
    assert load_model("llama-3.1-70b").params == pytest.approx(70.6e9, rel=0.01)
    assert LLAMA8.kv_bytes_per_token("bfloat16") == 2 * 32 * 8 * 128 * 2
    hf = {"num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4}
    hf |= {"intermediate_size": 128, "vocab_size": 100}
    spec = ModelSpec.from_hf_config(hf, name="tiny")
    assert (spec.kv_heads, spec.head_dim) == (4, 16)  # defaults: MHA, hidden / heads


def test_decode_step_scales_with_the_bytes_it_reads():
    r = Roofline(LLAMA8, HW["A100-80GB"])
    bw = HW["A100-80GB"].memory_bw_gbs * 1e9 * DECODE_BW_EFFICIENCY
    # batch 1: memory-bound; each extra context token costs its KV bytes at the effective bandwidth
    extra = r.decode_step_s(1, 4096) - r.decode_step_s(1, 2048)
    assert extra == pytest.approx(2048 * LLAMA8.kv_bytes_per_token() / bw, rel=1e-9)
    assert r.decode_step_s(1, 1) - DECODE_STEP_OVERHEAD_S == pytest.approx(LLAMA8.param_bytes() / bw, rel=0.01)
    slow = Roofline(LLAMA8, HW["A100-80GB"].model_copy(update={"memory_bw_gbs": 1019.5}))
    assert slow.decode_step_s(1, 1024) - DECODE_STEP_OVERHEAD_S == pytest.approx(
        2 * (r.decode_step_s(1, 1024) - DECODE_STEP_OVERHEAD_S), rel=1e-9
    )


def test_prefill_scales_with_flops():
    gpu = HW["H100-SXM"]
    r = Roofline(LLAMA8, gpu)
    tokens = 8192  # compute-bound
    assert r.prefill_s(tokens) - PREFILL_OVERHEAD_S == pytest.approx(
        LLAMA8.prefill_flops(tokens) / (gpu.dense_tflops * 1e12 * PREFILL_MFU), rel=1e-9
    )
    half = Roofline(LLAMA8, gpu.model_copy(update={"dense_tflops": gpu.dense_tflops / 2}))
    assert half.prefill_s(tokens) - PREFILL_OVERHEAD_S == pytest.approx(2 * (r.prefill_s(tokens) - PREFILL_OVERHEAD_S))
    # attention makes FLOPs (and time) grow faster than linearly in the prompt
    assert r.prefill_s(2 * tokens) > 2 * r.prefill_s(tokens) - PREFILL_OVERHEAD_S


@pytest.mark.parametrize("gpu", ["A100-80GB", "L4", "H100-PCIe"])
def test_tensor_parallelism_shortens_steps_and_pipeline_parallelism_adds_memory(gpu):
    one, two = Roofline(LLAMA8, HW[gpu], tp=1), Roofline(LLAMA8, HW[gpu], tp=2)
    assert two.decode_step_s(8, 1024) < one.decode_step_s(8, 1024)
    assert two.prefill_s(2048) < one.prefill_s(2048)
    assert two.comm_s(2048) > 0 == one.comm_s(2048)
    pp2 = Roofline(LLAMA8, HW[gpu], pp=2)
    assert pp2.kv_capacity_tokens > one.kv_capacity_tokens
    assert pp2.decode_step_s(8, 1024) >= one.decode_step_s(8, 1024)  # stages run one after another


def test_memory_fit():
    llama70 = load_model("llama-3.1-70b")
    with pytest.raises(DoesNotFit):
        estimate_profile(llama70, HW["A100-80GB"])
    with pytest.raises(DoesNotFit):
        estimate_profile(LLAMA8, HW["T4"])  # 16 GB of bf16 weights in a 16 GB card
    prof = estimate_profile(llama70, HW["A100-80GB"], tp=4)
    r = Roofline(llama70, HW["A100-80GB"], tp=4)
    used = r.weight_bytes_per_gpu + prof.kv_capacity_tokens * r.kv_bytes_per_token_per_gpu
    assert used <= r.usable_bytes_per_gpu < HW["A100-80GB"].memory_gib * (1 << 30)
    assert Roofline(llama70, HW["A100-80GB"], tp=8).kv_capacity_tokens > prof.kv_capacity_tokens


def test_estimated_profile_is_marked_and_round_trips():
    prof = estimate_profile(LLAMA8, HW["L40S"], tp=2)
    assert prof.source == ROOFLINE and prof.estimated and "L40S" in prof.notes
    again = EngineProfile.from_dict(prof.to_dict())
    r = Roofline(LLAMA8, HW["L40S"], tp=2)
    assert again.decode_step_s(64, 2048) == pytest.approx(r.decode_step_s(64, 2048))
    assert again.prefill_s(1024) == pytest.approx(r.prefill_s(1024))
    assert again.kv_bytes_per_token == LLAMA8.kv_bytes_per_token()
