"""`pdserve profile --quick` as a user runs it on the default config: a profile file the capacity
package loads, with real prefill, decode and handoff figures, and no engine process left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import psutil
import pytest

from capacity.profile import MEASURED, load_profiles
from serve.config import BUNDLED_SMOLLM2, DEFAULT_CONFIG, ClusterConfig
from serve.model_prep import resolve_model_path
from tests.conftest import REPO
from workers.profiler import QUICK_GRID

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_profile_quick_on_the_default_config(tmp_path):
    out = tmp_path / "profile.json"
    proc = subprocess.run(
        [sys.executable, "-m", "serve.cli", "profile", "--quick", "--out", str(out)],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not [c for c in psutil.Process().children(recursive=True) if c.is_running()]

    (prof,) = load_profiles(out)
    cfg = ClusterConfig.from_yaml(DEFAULT_CONFIG)
    assert (
        prof.key.model == cfg.model.name and prof.source == MEASURED and prof.key.device_type.startswith("cpu-1core-")
    )

    # prefill: every grid length, positive, longer prompts not faster (10 % noise allowed)
    tokens = [t for t, _ in prof.prefill]
    assert tokens == list(QUICK_GRID.prefill_tokens)
    times = [s for _, s in prof.prefill]
    assert all(s > 0 for s in times)
    assert all(b >= 0.9 * a for a, b in zip(times, times[1:])), times
    assert times[-1] > times[0]

    # decode: the full batch x context grid, steps between 1 ms and 2 s
    cells = {(b, c) for b, c, _ in prof.decode}
    assert cells == {(b, c) for b in QUICK_GRID.decode_batches for c in QUICK_GRID.decode_contexts}
    assert all(0.001 < s < 2.0 for _, _, s in prof.decode)

    # KV arithmetic from the model's config
    hf = json.loads((resolve_model_path(cfg.model.path, BUNDLED_SMOLLM2) / "config.json").read_text())
    dtype_bytes = {"bfloat16": 2, "float32": 4}[prof.key.dtype]
    assert prof.kv_bytes_per_token == (
        hf["num_hidden_layers"] * 2 * hf["num_key_value_heads"] * hf["head_dim"] * dtype_bytes
    )
    assert prof.kv_capacity_tokens > 0 and prof.max_num_seqs == cfg.pools[1].engine.max_num_seqs

    # handoff over the real transport: one point per prompt length, at its KV bytes
    assert [b for b, _ in prof.handoff] == [t * prof.kv_bytes_per_token for t in QUICK_GRID.prefill_tokens]
    assert all(0 < s < 5.0 for _, s in prof.handoff)
    assert prof.handoff_s(10 * 2**20) > 0
