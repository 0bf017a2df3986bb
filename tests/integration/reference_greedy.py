"""Greedy outputs of ONE colocated vLLM engine (the baseline a P/D path must reproduce).

Run as a subprocess (vLLM spawns processes; this keeps them out of the pytest process), by
``reference_outputs`` or as:
    python -m tests.integration.reference_greedy MODEL_DIR MAX_TOKENS DTYPE OUT.json < prompts.json
stdin: a JSON list of token-id lists; OUT.json: a JSON list of {text, token_ids}.
"""

from __future__ import annotations

import json
import os
import sys


def chat_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """Each text as one user turn through the model's chat template, as the ingress renders it."""

    def ids(text: str) -> list[int]:
        rendered = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
        )
        return tokenizer.encode(rendered, add_special_tokens=False)

    return [ids(t) for t in texts]


def reference_outputs(model_dir, prompts: list[list[int]], max_tokens: int, dtype: str, out_path) -> list[dict]:
    """This module run as a subprocess on ``prompts`` (token-id lists): one {text, token_ids} per prompt. One
    OpenMP thread, like each cluster engine: a different thread count changes the reduction order."""
    import subprocess

    from tests.conftest import REPO

    env = {**os.environ, "VLLM_CPU_OMP_THREADS_BIND": "1", "VLLM_LOGGING_LEVEL": "WARNING"}
    args = [sys.executable, "-m", "tests.integration.reference_greedy", str(model_dir), str(max_tokens), dtype]
    out = subprocess.run(
        [*args, str(out_path)],
        input=json.dumps(prompts),
        capture_output=True,
        text=True,
        cwd=REPO,
        env=env,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    with open(out_path) as f:
        return json.load(f)


def main() -> None:
    model_dir, max_tokens, dtype, out_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    prompts = json.loads(sys.stdin.read())
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    llm = LLM(
        model=model_dir,
        max_model_len=2048,
        block_size=128,
        dtype=dtype,
        enforce_eager=True,
        enable_prefix_caching=False,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    outs = []
    for ids in prompts:  # one at a time: same batch shapes as the sequential cluster requests
        o = llm.generate([TokensPrompt(prompt_token_ids=ids)], params, use_tqdm=False)[0].outputs[0]
        outs.append({"text": o.text, "token_ids": list(o.token_ids)})
    with open(out_path, "w") as f:
        json.dump(outs, f)


if __name__ == "__main__":
    main()
