"""Roofline estimates of engine profiles for GPU types this project cannot run: prefill is compute-bound,
a decode step is memory-bandwidth-bound, tensor and pipeline parallelism add communication.

Every profile made here has ``source=ROOFLINE`` (an estimate, never a measurement) and names the hardware
table row it came from. The efficiencies below are the share of a datasheet peak a serving engine reaches;
they are round numbers from public measurements, not fitted to this project's runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import yaml

from capacity.hardware import GpuSpec
from capacity.profile import ROOFLINE, EngineProfile, ProfileKey
from workers.config import GpuDevice

MODEL_CATALOG = Path(__file__).resolve().parent / "models.yaml"  # package data
GIB = 1 << 30
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4, "fp8": 1}

# Prefill GEMMs of a few hundred tokens and up reach 40-60 % of dense peak with FlashAttention kernels
# (MLPerf inference and vLLM/SGLang prefill benchmarks); 0.5 is the middle.
PREFILL_MFU = 0.5
# Decode GEMVs stream the weights and the KV cache; vLLM reaches 60-80 % of peak HBM bandwidth on
# A100/H100 at small batches (memory-bound kernels rarely pass 80 %).
DECODE_BW_EFFICIENCY = 0.7
# Large decode batches turn compute-bound with skinny GEMMs that use tensor cores poorly.
DECODE_MFU = 0.35
# Collectives over NVLink/PCIe reach ~80 % of the link's rated bandwidth (NCCL bus bandwidth tests).
LINK_EFFICIENCY = 0.8
ALLREDUCE_LATENCY_S = 15e-6  # one small NCCL all-reduce: launch plus hops, NVLink order
# Scheduler, sampling and kernel launches around every engine step (CUDA graphs on, vLLM V1 order)
DECODE_STEP_OVERHEAD_S = 2e-3
PREFILL_OVERHEAD_S = 5e-3
# CUDA context, activations and CUDA graphs' memory per GPU, outside what the KV cache may use
ACTIVATION_RESERVE_GIB = 1.5
# Share of GPU memory vLLM may use (the pool config's default, workers/config.py GpuDevice)
GPU_MEMORY_UTILIZATION = GpuDevice.model_fields["gpu_memory_utilization"].default

PREFILL_GRID_TOKENS = (1, 16, 64, 256, 1024, 2048, 4096, 8192, 16384, 32768)
DECODE_GRID_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DECODE_GRID_CONTEXT = (128, 512, 1024, 2048, 4096, 8192, 16384, 32768)
HANDOFF_GRID_BYTES = (1 << 20, 64 << 20, 1 << 30)


class DoesNotFit(ValueError):
    """The model's weights do not fit the GPUs of one replica."""


@dataclass(frozen=True)
class ModelSpec:
    """A decoder-only transformer's geometry (Llama-like: grouped-query attention, gated MLP)."""

    name: str
    layers: int
    hidden_size: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    intermediate_size: int
    params: int  # all parameters, embeddings included
    layer_params: int  # parameters of all transformer layers (what every token multiplies through)
    path: str = ""  # pool config model.path
    served_name: str = ""  # pool config model.name
    max_model_len: int = 8192

    def param_bytes(self, dtype: str = "bfloat16") -> int:
        return self.params * DTYPE_BYTES[dtype]

    def kv_bytes_per_token(self, dtype: str = "bfloat16") -> int:
        """K and V of one token, all layers."""
        return 2 * self.layers * self.kv_heads * self.head_dim * DTYPE_BYTES[dtype]

    def prefill_flops(self, tokens: float) -> float:
        """Forward FLOPs of a ``tokens``-long prompt: 2 x layer params x tokens, causal attention
        (QK^T and AV over half the square), one row of logits."""
        attention = 2 * self.layers * tokens * tokens * self.heads * self.head_dim
        return 2 * self.layer_params * tokens + attention + 2 * self.vocab * self.hidden_size

    def decode_flops(self, context_tokens: float) -> float:
        """FLOPs of one decode token of a sequence holding ``context_tokens`` of KV."""
        attention = 4 * self.layers * context_tokens * self.heads * self.head_dim
        return 2 * (self.layer_params + self.vocab * self.hidden_size) + attention

    @classmethod
    def from_hf_config(cls, cfg: dict, name: str = "", path: str = "", served_name: str = "") -> ModelSpec:
        layers, hidden = cfg["num_hidden_layers"], cfg["hidden_size"]
        heads = cfg["num_attention_heads"]
        kv_heads = cfg.get("num_key_value_heads", heads)
        head_dim = cfg.get("head_dim") or hidden // heads
        inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]
        attn = hidden * heads * head_dim * 2 + hidden * kv_heads * head_dim * 2  # q, o; k, v
        mlp = 3 * hidden * inter  # gate, up, down
        layer_params = layers * (attn + mlp + 2 * hidden)  # + two norms
        embeddings = vocab * hidden * (1 if cfg.get("tie_word_embeddings", False) else 2)
        name = name or cfg.get("_name_or_path", "") or "model"
        return cls(
            name=name,
            layers=layers,
            hidden_size=hidden,
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=vocab,
            intermediate_size=inter,
            params=layer_params + embeddings + hidden,
            layer_params=layer_params,
            path=path or name,
            served_name=served_name or name,
            max_model_len=min(cfg.get("max_position_embeddings", 8192), 32768),
        )


@cache
def _catalog() -> dict:
    return yaml.safe_load(MODEL_CATALOG.read_text())


def catalog_model(name: str) -> ModelSpec:
    """A model of capacity/models.yaml by name."""
    entry = _catalog()[name]
    return ModelSpec.from_hf_config(entry["config"], name=name, path=entry["path"], served_name=entry["served_name"])


SMOLLM2_135M = "smollm2-135m"


def load_model(ref: str) -> ModelSpec:
    """``ref`` = a capacity/models.yaml name (``bundled:smollm2`` = the bundled SmolLM2-135M) or the path
    of a Hugging Face config.json (or of a model directory holding one)."""
    if ref == "bundled:smollm2":
        ref = SMOLLM2_135M
    if ref in _catalog():
        return catalog_model(ref)
    p = Path(ref)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise ValueError(f"model {ref!r}: not a known name {sorted(_catalog())} nor a config.json")
    import json

    return ModelSpec.from_hf_config(json.loads(p.read_text()), name=p.parent.name, path=str(p.parent))


@dataclass(frozen=True)
class Roofline:
    """Closed-form timings of one replica of ``tp`` x ``pp`` GPUs of one type. Pipeline stages run one
    after another for a step (no micro-batch overlap), so PP adds memory, not speed."""

    model: ModelSpec
    gpu: GpuSpec
    tp: int = 1
    pp: int = 1
    dtype: str = "bfloat16"

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def usable_bytes_per_gpu(self) -> float:
        return self.gpu.memory_gib * GIB * GPU_MEMORY_UTILIZATION - ACTIVATION_RESERVE_GIB * GIB

    @property
    def weight_bytes_per_gpu(self) -> float:
        return self.model.param_bytes(self.dtype) / (self.tp * self.pp)

    @property
    def kv_bytes_per_token_per_gpu(self) -> float:
        """KV heads split over TP ranks (replicated when fewer heads than ranks), layers over stages."""
        heads = math.ceil(self.model.kv_heads / self.tp)
        return 2 * math.ceil(self.model.layers / self.pp) * heads * self.model.head_dim * self.dtype_bytes

    @property
    def fits(self) -> bool:
        return self.weight_bytes_per_gpu < self.usable_bytes_per_gpu

    @property
    def kv_capacity_tokens(self) -> int:
        free = self.usable_bytes_per_gpu - self.weight_bytes_per_gpu
        return max(int(free // self.kv_bytes_per_token_per_gpu), 0)

    def _link_bytes_per_s(self) -> float:
        return self.gpu.intra_node_gbs * 1e9 * LINK_EFFICIENCY

    def comm_s(self, tokens: float) -> float:
        """TP: two ring all-reduces of the activations per layer; PP: one activation send per stage boundary."""
        act = tokens * self.model.hidden_size * self.dtype_bytes
        s = 0.0
        if self.tp > 1:
            ring = 2 * (self.tp - 1) / self.tp * act / self._link_bytes_per_s()
            s += 2 * self.model.layers * (ring + ALLREDUCE_LATENCY_S)
        if self.pp > 1:
            s += (self.pp - 1) * (act / self._link_bytes_per_s() + ALLREDUCE_LATENCY_S)
        return s

    def prefill_s(self, tokens: float) -> float:
        compute = self.model.prefill_flops(tokens) / (self.tp * self.gpu.dense_tflops * 1e12 * PREFILL_MFU)
        weights = self.model.param_bytes(self.dtype) / self.tp / (self.gpu.memory_bw_gbs * 1e9 * DECODE_BW_EFFICIENCY)
        return max(compute, weights) + self.comm_s(tokens) + PREFILL_OVERHEAD_S

    def decode_step_s(self, batch: float, context_tokens: float) -> float:
        kv = batch * context_tokens * self.kv_bytes_per_token_per_gpu * self.pp  # all stages, one after another
        memory = (self.model.param_bytes(self.dtype) / self.tp + kv) / (
            self.gpu.memory_bw_gbs * 1e9 * DECODE_BW_EFFICIENCY
        )
        compute = (
            batch * self.model.decode_flops(context_tokens) / (self.tp * self.gpu.dense_tflops * 1e12 * DECODE_MFU)
        )
        return max(memory, compute) + self.comm_s(batch) + DECODE_STEP_OVERHEAD_S

    def handoff_s(self, nbytes: float) -> float:
        """KV arriving into this replica's GPU memory over its host link (PCIe)."""
        return nbytes / (self.gpu.pcie_gbs * 1e9 * LINK_EFFICIENCY) + ALLREDUCE_LATENCY_S


def estimate_profile(
    model: ModelSpec, gpu: GpuSpec, tp: int = 1, pp: int = 1, dtype: str = "bfloat16", max_num_seqs: int = 256
) -> EngineProfile:
    """The roofline of one replica sampled on the profile grids; raises ``DoesNotFit`` when the weights
    leave no room in ``tp`` x ``pp`` GPUs of ``gpu``."""
    r = Roofline(model, gpu, tp, pp, dtype)
    if not r.fits or r.kv_capacity_tokens < 1:
        raise DoesNotFit(
            f"{model.name} ({model.param_bytes(dtype) / GIB:.1f} GiB of weights) does not fit "
            f"tp={tp} x pp={pp} {gpu.name} ({gpu.memory_gib} GiB each)"
        )
    return EngineProfile(
        key=ProfileKey(model=model.name, device_type=gpu.name, tp=tp, pp=pp, dtype=dtype),
        device_kind="cuda",
        source=ROOFLINE,
        prefill=tuple((t, r.prefill_s(t)) for t in PREFILL_GRID_TOKENS),
        decode=tuple((b, c, r.decode_step_s(b, c)) for b in DECODE_GRID_BATCH for c in DECODE_GRID_CONTEXT),
        handoff=tuple((n, r.handoff_s(n)) for n in HANDOFF_GRID_BYTES),
        kv_bytes_per_token=model.kv_bytes_per_token(dtype),
        kv_capacity_tokens=r.kv_capacity_tokens,
        max_num_seqs=max_num_seqs,
        notes=f"estimate (roofline) from capacity/hardware.yaml row {gpu.name}: {gpu.source}",
        meta={
            "prefill_mfu": PREFILL_MFU,
            "decode_bw_efficiency": DECODE_BW_EFFICIENCY,
            "decode_mfu": DECODE_MFU,
            "gpu_memory_utilization": GPU_MEMORY_UTILIZATION,
        },
    )
