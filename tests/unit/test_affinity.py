import os

import pytest

from serve.affinity import decode_cores, inherited_affinity, serving_cores
from workers.config import PoolConfig, binding_cores


def pool(role: str, cores, kind: str = "cpu") -> PoolConfig:
    device = {"kind": "gpu", "count": 1} if kind == "gpu" else {"kind": "cpu", "cpu_cores": cores}
    return PoolConfig(name=role, role=role, device=device)


@pytest.mark.parametrize(
    "binding, want",
    [("0", {0}), ("0-3", {0, 1, 2, 3}), ("0,2-3", {0, 2, 3}), ("0-1,4", {0, 1, 4}), ("auto", None), ("nobind", None)],
)
def test_binding_cores(binding, want):
    assert binding_cores(binding) == want


def test_decode_cores_cover_every_rank_and_ignore_prefill_and_gpu_pools():
    assert decode_cores([pool("prefill", "0"), pool("decode", ["1", "2-3"])]) == {1, 2, 3}
    assert decode_cores([pool("decode", "auto")]) is None  # unpinned: cores unknown
    assert decode_cores([pool("decode", None, kind="gpu")]) == set()


@pytest.mark.parametrize(
    "setting, pools, want",
    [
        ("auto", [pool("prefill", "0"), pool("decode", "1")], {0, 2, 3}),
        ("auto", [pool("prefill", "0-1"), pool("decode", "2-3")], {0, 1}),
        ("auto", [pool("decode", "0-3")], None),  # no core left: unrestricted
        ("auto", [pool("decode", "auto")], None),
        ("auto", [pool("decode", "7")], None),  # pinned elsewhere: nothing to keep off
        ("all", [pool("decode", "1")], None),
        ("2-3", [pool("decode", "1")], {2, 3}),
    ],
)
def test_serving_cores(setting, pools, want):
    assert serving_cores(setting, pools, {0, 1, 2, 3}) == want


def test_default_two_core_layout_keeps_ray_on_the_prefill_core():
    assert serving_cores("auto", [pool("prefill", "0"), pool("decode", "1")], {0, 1}) == {0}


def test_processes_started_inside_inherit_the_cores_and_the_caller_gets_its_own_back():
    import subprocess
    import sys

    before = os.sched_getaffinity(0)
    one = {min(before)}
    with inherited_affinity(one):
        child = subprocess.run(
            [sys.executable, "-c", "import os; print(sorted(os.sched_getaffinity(0)))"],
            capture_output=True,
            text=True,
            check=True,
        )
    assert child.stdout.strip() == str(sorted(one))
    assert os.sched_getaffinity(0) == before
