"""capacity/workload.py: the presets carry the parameters of loadtests/workloads.py's workloads of the same
name (lengths there are in words, ~TOKENS_PER_WORD tokens each); one schema for presets, traces and YAML files,
with the simulator's requests and the planner's quantile points."""

import inspect
import statistics
from pathlib import Path

import numpy as np
import pytest

from capacity.workload import (
    PRESETS,
    QUANTILE_POINTS,
    Lengths,
    PrefixGroups,
    SimRequest,
    Workload,
    bursty_schedule,
    load_trace,
    load_workload,
)
from loadtests import workloads as lt

BENCH_OPTIONS = {  # simulator preset -> (loadtests workload, its options as loadtests.bench labels them)
    "random-256-128": ("random", {"input_tokens": 256, "output_tokens": 128}),
    "random-512-64": ("random", {}),
    "shared-prefix": ("shared-prefix", {}),
    "shared-prefix-wide": ("shared-prefix-wide", {"num_system_prompts": 12, "num_users": 48}),
    "bursty": ("bursty", {}),
    "chat": ("chat", {}),
}


def defaults(fn) -> dict:
    return {k: p.default for k, p in inspect.signature(fn).parameters.items() if p.default is not p.empty}


def test_every_preset_has_a_loadtests_workload():
    assert set(PRESETS) == set(BENCH_OPTIONS)
    assert all(name in lt.WORKLOADS for name, _ in BENCH_OPTIONS.values())


@pytest.mark.parametrize("preset", ["random-256-128", "random-512-64"])
def test_random_lengths(preset):
    _, opts = BENCH_OPTIONS[preset]
    p = {**defaults(lt.random_fixed), **opts}
    w = PRESETS[preset]
    assert (w.prompt_tokens.dist, w.prompt_tokens.value) == ("fixed", p["input_tokens"])
    assert (w.output_tokens.dist, w.output_tokens.value) == ("fixed", p["output_tokens"])
    specs = lt.build("random", seed=0, n=5, rate=1.0, **opts)
    assert {s.max_tokens for s in specs} == {w.output_tokens.value}
    assert {len(s.messages[0]["content"].split()) for s in specs} == {int(p["input_tokens"] / lt.TOKENS_PER_WORD)}


@pytest.mark.parametrize("preset", ["shared-prefix", "shared-prefix-wide"])
def test_shared_prefix_groups(preset):
    g, p = PRESETS[preset].prefix, {**defaults(lt.shared_prefix), **BENCH_OPTIONS[preset][1]}
    assert (g.num_system_prompts, g.num_users, g.system_tokens, g.turn_tokens) == (
        p["num_system_prompts"],
        p["num_users"],
        p["system_tokens"],
        p["turn_tokens"],
    )
    assert (g.answer_tokens, g.max_history_turns) == (p["output_tokens"], p["max_history_turns"])
    assert set(PRESETS[preset].output_quantiles()) == {p["output_tokens"]}
    assert {r.max_new_tokens for r in PRESETS[preset].requests(rate=1.0, n=50, seed=0)} == {p["output_tokens"]}


def test_shared_prefix_prompts_share_their_system_prompt_and_history():
    reqs = PRESETS["shared-prefix"].requests(rate=1.0, n=200, seed=0)
    g = PRESETS["shared-prefix"].prefix
    by_group: dict[str, list[SimRequest]] = {}
    for r in reqs:
        by_group.setdefault(r.group, []).append(r)
    assert len(by_group) == g.num_system_prompts
    for group in by_group.values():
        heads = {r.prompt_token_ids[: g.system_tokens] for r in group}
        assert len(heads) == 1
    longest = max(r.prompt_tokens for r in reqs)
    assert (
        longest == g.system_tokens + g.max_history_turns * g.turn_tokens + (g.max_history_turns - 1) * g.answer_tokens
    )


def test_bursty_schedule_and_lengths():
    w = PRESETS["bursty"]
    rate = 2.0
    assert [(d, m * rate) for d, m in w.schedule] == lt.bursty_schedule(rate, defaults(lt.bursty)["minute_s"])
    assert w.schedule == bursty_schedule()
    p = defaults(lt.random_fixed)
    assert (w.prompt_tokens.value, w.output_tokens.value) == (p["input_tokens"], p["output_tokens"])
    reqs = w.requests(rate, 10_000, seed=1)  # the schedule ends first: 165 s of arrivals
    assert max(r.arrival_s for r in reqs) < sum(d for d, _ in w.schedule)
    ramp = [r for r in reqs if 45 <= r.arrival_s < 105]  # the 3x minute
    assert len(ramp) / 60 == pytest.approx(3 * rate, rel=0.25)


def test_chat_lengths_match_the_loadtests_distribution():
    n = 3000
    specs = lt.build("chat", seed=0, n=n, rate=1.0)
    lt_prompt = statistics.median(len(s.messages[0]["content"].split()) * lt.TOKENS_PER_WORD for s in specs)
    lt_output = statistics.median(s.max_tokens for s in specs)
    reqs = PRESETS["chat"].requests(rate=1.0, n=n, seed=0)
    assert statistics.median(r.prompt_tokens for r in reqs) == pytest.approx(lt_prompt, rel=0.1)
    assert statistics.median(r.max_new_tokens for r in reqs) == pytest.approx(lt_output, rel=0.1)
    cap = defaults(lt.chat_mix)["max_model_len"]
    assert PRESETS["chat"].prompt_tokens.max == cap // 2 and PRESETS["chat"].output_tokens.max == cap // 4


def test_poisson_rate_and_seeds():
    w = PRESETS["random-256-128"]
    a = w.requests(rate=4.0, n=4000, seed=3)
    gaps = np.diff([r.arrival_s for r in a])
    assert gaps.mean() == pytest.approx(0.25, rel=0.05)
    assert a == w.requests(rate=4.0, n=4000, seed=3)
    assert a != w.requests(rate=4.0, n=4000, seed=4)


def test_trace_replays_as_recorded(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(
        '{"arrival_s": 0.5, "prompt_tokens": 10, "output_tokens": 3}\n'
        '{"arrival_s": 0.1, "prompt_tokens": 7, "output_tokens": 2}\n'
    )
    w = load_workload(f"trace:{f}")
    assert isinstance(w, Workload) and w == load_trace(f)
    reqs = w.requests(rate=99.0, n=10, seed=0)
    assert [(r.arrival_s, r.prompt_tokens, r.max_new_tokens) for r in reqs] == [(0.1, 7, 2), (0.5, 10, 3)]


def test_unknown_workload():
    with pytest.raises(ValueError, match="random-512-64"):
        load_workload("nope")


def test_bench_entries_map_to_presets():
    from loadtests.bench import VS_VLLM_WORKLOADS
    from loadtests.sim_validation import sim_preset

    assert [sim_preset(w) for w, _ in VS_VLLM_WORKLOADS[:3]] == ["random-256-128", "random-512-64", "shared-prefix"]
    assert all(sim_preset(w) in PRESETS for w in ("random", "chat", "shared-prefix-wide"))


WORKLOAD_FILES = sorted((Path(__file__).resolve().parents[2] / "configs" / "workloads").glob("*.yaml"))


@pytest.mark.parametrize("spec", [*PRESETS, *(str(f) for f in WORKLOAD_FILES)])
def test_every_preset_and_file_gives_requests_and_quantile_points(spec):
    w = load_workload(spec)
    assert w.name == (Path(spec).stem if spec.endswith(".yaml") else spec)
    for q in (w.prompt_quantiles(), w.output_quantiles()):
        assert len(q) == QUANTILE_POINTS and list(q) == sorted(q) and q.min() >= 1
    assert 0 <= w.cached_share < 1
    reqs = w.requests(rate=w.rate or 4.0, n=300, seed=0)  # bursty: its schedule holds 300 at 4 req/s
    prompts = [r.prompt_tokens for r in reqs]
    assert len(reqs) == 300 and min(prompts) >= 1
    assert min(prompts) <= w.prompt_quantiles().mean() <= max(prompts)


def test_workload_files_keep_their_rate_and_lengths():
    assert len(WORKLOAD_FILES) >= 2
    small = load_workload(next(f for f in WORKLOAD_FILES if f.stem == "cpu-small"))
    assert small.rate == 0.5 and small.with_rate(2.0).rate == 2.0
    reqs = small.requests(rate=small.rate, n=2000, seed=1)
    prompts, outputs = [r.prompt_tokens for r in reqs], [r.max_new_tokens for r in reqs]
    assert (min(prompts), max(prompts)) == (64, 512) and (min(outputs), max(outputs)) == (16, 64)
    assert statistics.mean(prompts) == pytest.approx(small.prompt_quantiles().mean(), rel=0.03)


def test_prefix_groups_planner_view_is_the_full_history():
    w = PRESETS["shared-prefix"]
    g = w.prefix
    longest = max(r.prompt_tokens for r in w.requests(rate=1.0, n=500, seed=0))
    assert set(w.prompt_quantiles()) == {longest} == {g.full_prompt_tokens}
    assert w.cached_share == pytest.approx(g.system_tokens / longest)


def test_trace_quantiles_are_the_recorded_lengths(tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(
        "".join(f'{{"arrival_s": {i}, "prompt_tokens": {10 * (i + 1)}, "output_tokens": 5}}\n' for i in range(4))
    )
    w = load_trace(f)
    assert sorted(set(w.prompt_quantiles())) == [10, 20, 30, 40] and set(w.output_quantiles()) == {5}
    assert list(w.prompt_quantiles(4)) == [10, 20, 30, 40]


def test_one_source_of_lengths():
    lengths = {"prompt_tokens": Lengths(value=10), "output_tokens": Lengths(value=5)}
    with pytest.raises(ValueError, match="needs prompt_tokens"):
        Workload(prompt_tokens=Lengths(value=10))
    with pytest.raises(ValueError, match="trace gives"):
        Workload(trace=((0.0, 1, 1),), **lengths)
    with pytest.raises(ValueError, match="prefix groups give"):
        Workload(prefix=PrefixGroups(), prefix_share=0.2)
    with pytest.raises(ValueError, match="extra"):
        Workload.model_validate({"prompt_tokens": {"value": 1}, "output_tokens": {"value": 1}, "sla": 1})
    with pytest.raises(ValueError, match="no rate"):
        PRESETS["chat"].with_rate(None)
    assert PRESETS["chat"].with_rate(3.0).rate == 3.0 and PRESETS["chat"].rate is None
