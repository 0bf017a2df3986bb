"""Offline KV-compression quality study: greedy agreement of quantized prompt KV vs exact.

For each prompt, the model (HF transformers, float32, one thread) prefills the prompt minus its last
token; the prompt's KV in every layer is then replaced by its quantize -> dequantize round trip under
each variant, and 32 tokens are decoded greedily. A prompt "agrees" when all 32 tokens equal the
unperturbed run (the issue-3 quality criterion). This isolates the codec from the engines: the
integration test (tests/integration/test_kvtransfer_connector.py) measures the same thing through
real vLLM engines and NIXL on its 5 prompts.

Variants (all group-wise along head_dim, groups of 32, asymmetric, kvtransfer/quant.py):
  int8, int4     the connector's codecs (Hadamard rotation of head_dim first, kvtransfer/codec.py)
  int4_norot     int4 without the rotation
  int4_rsh       int4 with a randomised Hadamard rotation (random signs first, fixed seed)
  int4_sink      int4, the first 4 tokens (attention sinks) exact
  int4_sink1     int4, the first token exact
  int4_konly     int4 on K only, V exact (diagnostic: which of K and V the errors come from)
  int4_vonly     int4 on V only, K exact (diagnostic)
  int8_norot     int8 without the rotation
  int4_recent    int4, the last 16 prompt tokens exact
  int4_sink_recent  both
  int4_g16       int4 with groups of 16 (more scale bytes: 0.375x of bf16 instead of 0.29x)
  bf16, fp16     the KV cast to 16-bit floats and back: the noise floor of the criterion (a bf16
                 deployment's own cache dtype already moves the greedy tokens this much)

    python -m loadtests.kv.kv_int4_study [--variants int8,int4,...] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from kvtransfer.codec import hadamard
from kvtransfer.quant import GroupQuant

REPO = Path(__file__).resolve().parents[2]
TOKENS = 32

# the integration test's 5 prompts (structured, 90-700 tokens) and 15 everyday chat requests
TEST_PROMPTS = [
    "Explain in two sentences why the sky is blue. " + "Be precise and concise. " * 12,
    "Summarise this list: " + " ".join(f"Item {i} is a small red box placed on shelf {i % 7}." for i in range(18)),
    "Continue the story: "
    + " ".join(
        f"On day {i} the traveller crossed river {i % 5} and met a {['fox', 'crow', 'bear'][i % 3]}." for i in range(26)
    ),
    "Answer the last question. "
    + " ".join(f"Question {i}: what is {i} plus {2 * i}? Answer: {3 * i}." for i in range(28)),
    "Describe the table: "
    + " ".join(
        f"Row {i}: city {['Paris', 'Rome', 'Oslo', 'Lima'][i % 4]}, population {1000 + 37 * i}, rainfall {i % 9} mm."
        for i in range(30)
    ),
]
CHAT_PROMPTS = [
    "What are the main causes of the French Revolution? Give three and explain each briefly.",
    "Write a short poem about autumn leaves falling in a quiet park.",
    "How does photosynthesis work? Explain it to a ten year old.",
    "Give me a recipe for a simple tomato pasta sauce with garlic and basil.",
    "What is the difference between a virus and a bacterium?",
    "Explain how a bicycle stays upright when it is moving.",
    "Write an email to my manager asking for a day off next Friday.",
    "List five tips for improving sleep quality and explain why they help.",
    "Why do cats purr? Describe what scientists currently think.",
    "Translate the following sentence into French: The library opens at nine in the morning.",
    "What should I pack for a three day hiking trip in the mountains?",
    "Explain what a black hole is and how it forms.",
    "Describe the water cycle in a few clear steps.",
    "What are the benefits of learning a second language as an adult?",
    "Summarise the plot of Romeo and Juliet in a short paragraph.",
]


def round_trip(x: torch.Tensor, q: GroupQuant) -> torch.Tensor:
    """Quantize -> dequantize with groups along the last dim (any leading shape)."""
    flat = x.contiguous().reshape(-1)
    pad = (-flat.numel()) % (2 * q.group)
    f = torch.cat([flat, flat.new_zeros(pad)]) if pad else flat
    return q.decode(q.encode(f), (f.numel(),), x.dtype)[: flat.numel()].reshape(x.shape)


def make_variants(head_dim: int) -> dict:
    h = hadamard(head_dim)
    q4, q8, q4g16 = GroupQuant(4, 32), GroupQuant(8, 32), GroupQuant(4, 16)

    signs = torch.randint(0, 2, (head_dim,), generator=torch.Generator().manual_seed(0)) * 2.0 - 1.0
    rsh = signs[:, None] * h  # diag(signs) @ H: still orthonormal

    def rotated(q, r=h):
        return lambda k, v: (round_trip(k @ r, q) @ r.T, round_trip(v @ r, q) @ r.T)

    def keep_exact(base, first: int = 0, last: int = 0):
        def f(k, v):
            kk, vv = base(k, v)
            if first:
                kk[:, :, :first], vv[:, :, :first] = k[:, :, :first], v[:, :, :first]
            if last:
                kk[:, :, -last:], vv[:, :, -last:] = k[:, :, -last:], v[:, :, -last:]
            return kk, vv

        return f

    def cast(dtype):
        return lambda k, v: (k.to(dtype).to(k.dtype), v.to(dtype).to(v.dtype))

    int4 = rotated(q4)
    return {
        "int8": rotated(q8),
        "int4": int4,
        "int4_norot": lambda k, v: (round_trip(k, q4), round_trip(v, q4)),
        "int4_rsh": rotated(q4, rsh),
        "int4_sink": keep_exact(int4, first=4),
        "int4_recent": keep_exact(int4, last=16),
        "int4_sink1": keep_exact(int4, first=1),
        "int4_konly": lambda k, v: (int4(k, v)[0], v),
        "int4_vonly": lambda k, v: (k, int4(k, v)[1]),
        "int8_norot": lambda k, v: (round_trip(k, q8), round_trip(v, q8)),
        "int4_sink_recent": keep_exact(int4, first=4, last=16),
        "int4_g16": rotated(q4g16),
        "bf16": cast(torch.bfloat16),
        "fp16": cast(torch.float16),
    }


@torch.no_grad()
def greedy(model, ids: list[int], perturb=None) -> list[int]:
    out = model(input_ids=torch.tensor([ids[:-1]]), use_cache=True)
    cache = out.past_key_values
    if perturb is not None:
        for layer in cache.layers:
            layer.keys, layer.values = perturb(layer.keys, layer.values)
    last, toks = ids[-1], []
    for _ in range(TOKENS):
        o = model(input_ids=torch.tensor([[last]]), past_key_values=cache, use_cache=True)
        cache = o.past_key_values
        last = int(o.logits[0, -1].argmax())
        toks.append(last)
    return toks


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary["variants"])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    for i, (group, color) in enumerate((("test", "tab:blue"), ("chat", "tab:orange"), ("all", "tab:gray"))):
        ax.bar(
            [j + (i - 1) * 0.27 for j in range(len(names))],
            [summary["variants"][n][f"agree_{group}"] for n in names],
            0.27,
            label=group,
            color=color,
        )
    ax.axhline(0.9, color="red", lw=1, ls="--", label="goal 90 %")
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel(f"prompts with first {TOKENS} tokens exact")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--variants", default="int8,int4,int4_norot,int4_sink,int4_recent,int4_sink_recent,int4_g16")
    ap.add_argument("--model", default=None, help="HF model dir (default: the bundled SmolLM2)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.model is None:
        args.model = (
            subprocess.run(
                [sys.executable, "-m", "serve.cli", "prepare-model"],
                cwd=REPO,
                check=True,
                capture_output=True,
                text=True,
            )
            .stdout.strip()
            .splitlines()[-1]
        )
    torch.set_num_threads(1)
    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    variants = make_variants(model.config.hidden_size // model.config.num_attention_heads)
    chosen = args.variants.split(",")
    rows, t0 = [], time.monotonic()
    for group, prompts in (("test", TEST_PROMPTS), ("chat", CHAT_PROMPTS)):
        for text in prompts:
            ids = tok.encode(
                tok.apply_chat_template(
                    [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
                ),
                add_special_tokens=False,
            )
            base = greedy(model, ids)
            row = {"group": group, "prompt_tokens": len(ids), "first_diverge": {}}
            for name in chosen:
                got = greedy(model, ids, variants[name])
                row["first_diverge"][name] = next((i for i, (a, b) in enumerate(zip(got, base)) if a != b), TOKENS)
            rows.append(row)
            print(json.dumps(row), flush=True)
    summary = {
        "tokens": TOKENS,
        "model": Path(args.model).name,
        "seconds": round(time.monotonic() - t0),
        "variants": {},
    }
    for name in chosen:
        entry = {}
        for group in ("test", "chat", "all"):
            rs = [r for r in rows if group == "all" or r["group"] == group]
            entry[f"agree_{group}"] = sum(r["first_diverge"][name] == TOKENS for r in rs) / len(rs)
            entry[f"n_{group}"] = len(rs)
        entry["mean_first_diverge"] = sum(r["first_diverge"][name] for r in rows) / len(rows)
        summary["variants"][name] = entry
    out = (
        Path(args.out)
        if args.out
        else REPO / "loadtests" / "results" / (time.strftime("%Y%m%d-%H%M%S", time.gmtime()) + "-int4-study")
    )
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps({"summary": summary, "rows": rows}, indent=1))
    plot(summary, out / "int4_study.png")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
