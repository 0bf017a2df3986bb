"""The router pipeline decides exactly as the single-function placement it replaced: seeded scenarios
(configs, replica states, prefix-index contents, fitted cost models, request sequences with tier
activity) run through the slo-aware policy, and every outcome must equal the table below, which was
recorded from that placement. Rules added since (``placement.local_prefill_when_idle``) are off here: the
table pins the decisions the placement made without them. Pure; regenerate the table only for an intended
change of decisions."""

import random

import pytest

from router.config import RouterConfig
from router.hashing import block_keys
from router.pipeline import SloAwarePolicy
from router.prefix_index import PrefixIndex
from router.tier_activity import TierActivity
from router.types import EndpointState, PoolSnapshot, Rejection, RequestDescriptor, Role

CONFIGS = [
    {},
    {"admission": {"enabled": False}},
    {"admission": {"tier_idle_s": None}},
    {"admission": {"decode_throttle": "reject", "tier_budget": "slo", "tpot_budget": "slo"}},
    {
        "placement": {"local_prefill_when_sooner": True, "prefill_queue_limit_tokens": 3000},
        "admission": {"prefill_tokens_per_s_prior": 5000.0, "decode_step_s_prior": 0.05},
        "slo": {"ttft_ms": 4000, "tpot_ms": 250},
    },
    {
        "placement": {
            "prefix_weight": 2.0,
            "load_weight": 0.3,
            "kv_weight": 0.7,
            "max_batch_hint": 8,
            "local_prefill_max_tokens": 256,
            "local_prefill_min_hit_ratio": 0.5,
        }
    },
]
TIERS = ("free", "standard", "premium", "warmup")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def scenario(seed: int):
    """(policy, clock, [(request, snapshot, admit, seconds to advance the clock first), ...])."""
    rng = random.Random(seed)
    bs = rng.choice((16, 128))
    base = CONFIGS[seed % len(CONFIGS)]
    cfg = RouterConfig(**{**base, "placement": {**base.get("placement", {}), "local_prefill_when_idle": False}})
    clock = Clock()
    activity = None if cfg.admission.tier_idle_s is None else TierActivity(cfg.admission.tier_idle_s, clock)
    pol = SloAwarePolicy(cfg, PrefixIndex(), {}, bs, random.Random(seed), activity=activity)
    eps = []
    for role, n in ((Role.DECODE, rng.choice((0, 1, 2, 2, 3, 3, 3))), (Role.PREFILL, rng.choice((0, 1, 2, 3)))):
        for i in range(n):
            queued = rng.choice((0, 0, rng.randrange(1, 800), rng.randrange(1, 6000)))
            by_prio = ((-100, queued // 3), (-10, queued - queued // 3)) if queued and rng.random() < 0.5 else ()
            eps.append(
                EndpointState(
                    f"{role.value[0]}{i}",
                    role.value,
                    role,
                    rng.random() < 0.9,
                    num_running=rng.randrange(0, 12),
                    num_waiting=rng.randrange(0, 3),
                    kv_usage=rng.random() * 0.9,
                    kv_capacity_tokens=rng.choice((0, 50_000)),
                    in_flight=rng.randrange(0, 6),
                    queued_prefill_tokens=queued,
                    queued_prefill_by_priority=by_prio,
                    priority_step_tokens=rng.choice((0, 0, 256)),
                )
            )
    for pool in ("decode", "prefill"):
        if rng.random() < 0.5:
            m = pol.model(pool)
            for _ in range(20):
                x = rng.randrange(50, 3000)
                m.observe_prefill(x, 0.02 + x / rng.uniform(200, 4000))
                b = rng.randrange(1, 16)
                m.observe_decode(b, 0.05 + 0.004 * b, rng.randrange(0, 40_000))
            m.observe_ttft_ratio(rng.uniform(0.5, 2.0))
            m.observe_tpot_ratio(rng.uniform(0.5, 2.0))
    steps = []
    for k in range(4):
        tokens = rng.choice((20, 100, 300, 700, 1500, 2900))
        keys = tuple(block_keys([rng.randrange(7) if k % 2 else 1 for _ in range(tokens)], bs, None))
        for e in eps:
            if rng.random() < 0.6:
                pol.prefix_index.add(e.endpoint_id, keys[: rng.randrange(0, len(keys) + 1)])
        req = RequestDescriptor(f"r{seed}-{k}", "m", tokens, rng.choice((16, 128, 600)), rng.choice(TIERS), 0.0, keys)
        steps.append((req, PoolSnapshot(list(eps)), rng.random() < 0.85, rng.choice((0.0, 5.0, 40.0))))
    return pol, clock, steps


def outcome(d) -> tuple:
    if isinstance(d, Rejection):
        return ("reject", d.reason, d.status_code, d.retry_after_s)
    return (
        d.decode.endpoint_id,
        d.prefill and d.prefill.endpoint_id,
        d.reason,
        d.prefix_hit_tokens,
        d.uncached_tokens,
        _r9(d.predicted_ttft_s),
        _r9(d.predicted_tpot_s),
        d.max_new_tokens,
    )


def _r9(x: float | None) -> float | None:
    return None if x is None else round(x, 9)


def run(seed: int) -> list[tuple]:
    pol, clock, steps = scenario(seed)
    out = []
    for req, snap, admit, advance in steps:
        clock.t += advance
        d = pol.route(req, snap, admit=admit)
        pol.on_routed(req, d, moved=not admit)  # as the orchestrator does, once per routing
        out.append(outcome(d))
    return out


SEEDS = range(120)


@pytest.mark.parametrize("seed", SEEDS)
def test_decisions_match_the_recorded_table(seed):
    assert run(seed) == EXPECTED[seed]


# recorded from the single-function placement, with its caller recording what it routed in the index
EXPECTED: dict[int, list[tuple]] = {
    0: [
        ("d2", None, "local_prefill:short", 640, 60, 0.635310696, 0.098516921, None),
        ("d0", None, "local_prefill:short", 0, 20, 1.902162796, 0.092617675, None),
        ("reject", "overload_ttft", 503, 2.0),
        ("d1", None, "local_prefill:short", 256, 44, None, None, None),
    ],
    1: [
        ("d0", None, "local_prefill:no_prefill_replica", 352, 348, None, None, None),
        ("d0", None, "local_prefill:no_prefill_replica", 2128, 772, None, None, None),
        ("d0", None, "local_prefill:short", 688, 12, None, None, None),
        ("d0", None, "local_prefill:short", 64, 36, None, None, None),
    ],
    2: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    3: [
        ("d2", None, "local_prefill:no_prefill_replica", 1296, 204, 0.107081159, 0.106324988, None),
        ("d2", None, "local_prefill:no_prefill_replica", 1232, 268, None, None, None),
        ("d2", None, "local_prefill:short", 96, 4, 0.107679417, 0.107094893, None),
        ("reject", "overload_ttft", 503, 2.0),
    ],
    4: [
        ("d1", None, "local_prefill:short", 96, 4, 0.2809, 0.0704, None),
        ("d1", None, "local_prefill:no_prefill_replica", 320, 380, None, None, None),
        ("d1", None, "local_prefill:no_prefill_replica", 96, 2804, 0.8437, 0.072908, None),
        ("d0", None, "local_prefill:short", 272, 28, None, None, None),
    ],
    5: [
        ("reject", "overload_ttft", 503, 6.0),
        ("reject", "overload_ttft", 503, 6.0),
        ("d1", None, "local_prefill:short", 640, 60, None, None, None),
        ("d0", None, "local_prefill:short", 256, 44, 0.316966667, 0.120308, None),
    ],
    6: [
        ("reject", "overload_ttft", 503, 10.0),
        ("reject", "overload_ttft", 503, 19.0),
        ("reject", "overload_ttft", 503, 19.0),
        ("d1", "p0", "remote_prefill", 0, 2900, None, None, None),
    ],
    7: [
        ("d0", "p0", "remote_prefill", 384, 316, None, None, None),
        ("d0", "p1", "remote_prefill", 0, 100, None, None, None),
        ("d0", "p1", "remote_prefill", 0, 100, None, None, None),
        ("d0", "p1", "remote_prefill", 0, 100, None, None, None),
    ],
    8: [
        ("d0", "p1", "remote_prefill", 2528, 372, 0.124218615, 0.122908, None),
        ("d1", "p1", "remote_prefill", 672, 28, None, None, None),
        ("d0", None, "local_prefill:short", 688, 12, 0.2107, 0.120764, None),
        ("reject", "overload_ttft", 503, 3.0),
    ],
    9: [
        ("d0", None, "local_prefill:short", 640, 60, None, None, None),
        ("d2", None, "local_prefill:short", 256, 44, 0.090013141, 0.080276461, None),
        ("d0", None, "local_prefill:short", 256, 44, 0.084600174, 0.075468833, None),
        ("d0", "p1", "remote_prefill", 0, 700, None, None, None),
    ],
    10: [
        ("d1", None, "local_prefill:short", 64, 36, None, None, None),
        ("d0", None, "local_prefill:short", 16, 4, 0.13282, 0.082028, None),
        ("d1", None, "local_prefill:short", 96, 4, 0.1489, 0.098164, None),
        ("d0", None, "local_prefill:sooner", 0, 100, 0.1521, 0.0824, None),
    ],
    11: [
        ("d0", None, "local_prefill:cached", 768, 732, 0.606645586, 0.097566316, None),
        ("d1", "p2", "remote_prefill", 512, 188, 0.789147245, 0.10908202, None),
        ("d0", None, "local_prefill:short", 640, 60, 0.105791532, 0.097921592, None),
        ("d2", None, "local_prefill:short", 0, 20, 0.10283069, 0.095193214, None),
    ],
    12: [
        ("d1", "p1", "remote_prefill", 1408, 92, 0.432512262, 0.078560753, None),
        ("d1", "p1", "remote_prefill", 1408, 92, 0.432512262, 0.078416457, None),
        ("d1", None, "local_prefill:cached", 1408, 92, 0.071660249, 0.078560753, None),
        ("d1", None, "local_prefill:short", 0, 20, None, None, None),
    ],
    13: [
        ("d0", "p0", "remote_prefill", 512, 188, None, None, None),
        ("d1", "p0", "remote_prefill", 0, 1500, None, None, None),
        ("d0", "p0", "remote_prefill", 0, 100, None, None, None),
        ("d0", "p0", "remote_prefill", 0, 100, None, None, None),
    ],
    14: [
        ("d0", None, "local_prefill:short", 16, 4, 1.19081, 0.150874, None),
        ("reject", "tier_quota", 429, 1.0),
        ("reject", "overload_ttft", 503, 2.0),
        ("d2", None, "local_prefill:no_prefill_replica", 0, 700, 2.488033333, 0.105, None),
    ],
    15: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    16: [
        ("d0", "p2", "remote_prefill", 0, 100, 0.153004961, 0.084181962, None),
        ("d0", None, "local_prefill:short", 0, 20, 0.079796633, 0.084177403, None),
        ("d0", "p2", "remote_prefill", 0, 100, 0.153004961, 0.084181962, None),
        ("d0", "p2", "remote_prefill", 0, 100, 0.153004961, 0.084237435, None),
    ],
    17: [
        ("d1", None, "local_prefill:short", 256, 44, 0.218735256, 0.096803709, None),
        ("d2", "p0", "remote_prefill", 0, 300, 1.159224977, 0.116686396, None),
        ("d1", None, "local_prefill:cached", 1536, 1364, None, None, None),
        ("d1", "p0", "remote_prefill", 512, 188, 0.767132206, 0.096528988, None),
    ],
    18: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    19: [
        ("d2", None, "local_prefill:no_prefill_replica", 2400, 500, None, None, None),
        ("d2", None, "local_prefill:no_prefill_replica", 192, 108, None, None, None),
        ("d2", None, "local_prefill:short", 288, 12, None, None, None),
        ("d1", None, "local_prefill:no_prefill_replica", 160, 140, None, None, None),
    ],
    20: [
        ("d0", None, "local_prefill:no_prefill_replica", 576, 124, 0.592679333, 0.129354, None),
        ("d0", None, "local_prefill:no_prefill_replica", 0, 300, 1.178946, 0.129246, None),
        ("d0", None, "local_prefill:short", 96, 4, 0.192079333, 0.12881, None),
        ("d1", None, "local_prefill:short", 96, 4, 0.226533333, 0.1635, None),
    ],
    21: [
        ("d1", "p1", "remote_prefill", 288, 1212, 4.242726, 0.15279, None),
        ("d1", "p1", "remote_prefill", 464, 1036, 3.656059333, 0.152734, None),
        ("reject", "overload_ttft", 503, 15.0),
        ("d1", "p2", "remote_prefill", 1600, 1300, 4.537459333, 0.154134, None),
    ],
    22: [
        ("d0", None, "local_prefill:short", 96, 4, 0.1529, 0.1024, None),
        ("d0", None, "local_prefill:short", 0, 20, None, None, None),
        ("d0", None, "local_prefill:no_prefill_replica", 240, 1260, 0.4055, 0.103508, None),
        ("d0", None, "local_prefill:short", 0, 20, 0.15602, 0.102028, None),
    ],
    23: [
        ("d0", None, "local_prefill:short", 0, 20, None, None, None),
        ("d1", None, "local_prefill:short", 640, 60, 0.417656, 0.167956, 128),
        ("d1", None, "local_prefill:cached", 384, 316, 1.270989333, 0.167956, 128),
        ("d0", None, "local_prefill:short", 0, 100, 0.618072333, 0.125039, None),
    ],
    24: [
        ("d1", "p0", "remote_prefill", 0, 700, None, None, None),
        ("d1", "p0", "remote_prefill", 0, 700, None, None, None),
        ("reject", "tier_quota", 429, 1.0),
        ("d1", None, "local_prefill:short", 256, 44, 0.11440475, 0.100340196, None),
    ],
    25: [
        ("d2", None, "local_prefill:no_prefill_replica", 0, 100, None, None, None),
        ("d1", None, "local_prefill:no_prefill_replica", 2432, 468, None, None, None),
        ("d2", None, "local_prefill:no_prefill_replica", 1280, 220, None, None, None),
        ("d2", None, "local_prefill:no_prefill_replica", 768, 732, None, None, None),
    ],
    26: [
        ("d1", "p0", "remote_prefill", 0, 300, 1.12717358, 0.076469829, None),
        ("d0", None, "local_prefill:cached", 1376, 124, 0.096162491, 0.090197458, None),
        ("d1", "p0", "remote_prefill", 288, 412, 1.50037194, 0.076257118, None),
        ("d0", None, "local_prefill:short", 16, 4, 0.096562768, 0.090692444, None),
    ],
    27: [
        ("d0", None, "local_prefill:short", 0, 20, 0.097278851, 0.094313612, None),
        ("reject", "overload_ttft", 503, 1.0),
        ("d0", None, "local_prefill:cached", 1408, 92, 0.096427448, 0.093416867, None),
        ("d0", "p0", "remote_prefill", 0, 2900, 3.481760049, 0.09274552, None),
    ],
    28: [
        ("d1", "p0", "remote_prefill", 1456, 44, 0.251219154, 0.063564, None),
        ("d1", None, "local_prefill:short", 0, 20, 0.11602, 0.062028, None),
        ("d1", None, "local_prefill:short", 96, 4, None, None, None),
        ("d1", None, "local_prefill:short", 0, 20, 0.11602, 0.06232, None),
    ],
    29: [
        ("reject", "overload_ttft", 503, 9.0),
        ("d1", "p0", "remote_prefill", 0, 1500, None, None, None),
        ("reject", "overload_ttft", 503, 9.0),
        ("d0", None, "local_prefill:cached", 384, 316, 1.5587, 0.108764, None),
    ],
    30: [
        ("d1", None, "local_prefill:short", 0, 20, 0.260573667, 0.143971, None),
        ("d1", None, "local_prefill:no_prefill_replica", 0, 100, 0.527320333, 0.144287, None),
        ("d1", None, "local_prefill:short", 0, 20, 0.260573667, 0.143915, None),
        ("d1", None, "local_prefill:no_prefill_replica", 128, 172, None, None, None),
    ],
    31: [
        ("d0", None, "local_prefill:short", 16, 4, None, None, None),
        ("d0", None, "local_prefill:short", 672, 28, None, None, None),
        ("d0", None, "local_prefill:short", 16, 4, None, None, None),
        ("d0", None, "local_prefill:no_prefill_replica", 0, 300, None, None, None),
    ],
    32: [
        ("d0", None, "local_prefill:short", 16, 4, 0.11248181, 0.104533562, None),
        ("d0", None, "local_prefill:short", 0, 20, 0.112498438, 0.104506423, None),
        ("d0", None, "local_prefill:short", 16, 4, 0.11248181, 0.104392051, None),
        ("d0", None, "local_prefill:short", 0, 20, 0.112498438, 0.104392051, None),
    ],
    33: [
        ("d1", None, "local_prefill:no_prefill_replica", 1280, 220, 0.223634572, 0.10006869, None),
        ("reject", "overload_ttft", 503, 6.0),
        ("d1", None, "local_prefill:no_prefill_replica", 1488, 1412, 1.691601753, 0.099148599, None),
        ("d1", None, "local_prefill:short", 16, 4, None, None, None),
    ],
    34: [
        ("d2", None, "local_prefill:no_prefill_replica", 0, 300, None, None, None),
        ("d2", None, "local_prefill:no_prefill_replica", 1024, 1876, 1.237832754, 0.076272122, None),
        ("d2", None, "local_prefill:no_prefill_replica", 0, 100, 0.33176692, 0.075724393, None),
        ("d2", None, "local_prefill:short", 0, 20, 0.290962443, 0.075708744, None),
    ],
    35: [
        ("d0", None, "local_prefill:short", 512, 188, None, None, None),
        ("d2", "p0", "remote_prefill", 1024, 1876, None, None, None),
        ("d0", None, "local_prefill:short", 0, 20, 0.243467667, 0.126809, None),
        ("d1", "p0", "remote_prefill", 0, 2900, 9.855915667, 0.139549, None),
    ],
    36: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    37: [
        ("d2", None, "local_prefill:no_prefill_replica", 224, 76, None, None, None),
        ("d2", None, "local_prefill:short", 80, 20, None, None, None),
        ("d2", None, "local_prefill:short", 288, 12, None, None, None),
        ("d2", None, "local_prefill:short", 1488, 12, None, None, None),
    ],
    38: [
        ("reject", "overload_ttft", 503, 2.0),
        ("reject", "overload_ttft", 503, 2.0),
        ("d0", None, "local_prefill:no_prefill_replica", 128, 1372, None, None, None),
        ("d0", None, "local_prefill:short", 0, 20, None, None, None),
    ],
    39: [
        ("d1", "p2", "remote_prefill", 672, 28, None, None, None),
        ("d1", "p1", "remote_prefill", 1360, 140, None, None, None),
        ("d1", None, "local_prefill:short", 688, 12, 0.199087, 0.109387, None),
        ("d1", None, "local_prefill:short", 48, 52, 0.331820333, 0.108551, None),
    ],
    40: [
        ("d1", None, "local_prefill:no_prefill_replica", 512, 188, 0.1823, 0.094708, None),
        ("d2", None, "local_prefill:short", 256, 44, 0.2633, 0.090364, None),
        ("d1", None, "local_prefill:short", 640, 60, 0.1567, 0.094764, None),
        ("d0", None, "local_prefill:no_prefill_replica", 1024, 476, None, None, None),
    ],
    41: [
        ("d0", None, "local_prefill:short", 256, 44, 0.11143586, 0.110031891, None),
        ("d0", "p0", "remote_prefill", 1408, 92, 0.114292461, 0.109504034, None),
        ("d0", None, "local_prefill:short", 256, 44, 0.11143586, 0.110160336, None),
        ("d0", "p0", "remote_prefill", 256, 44, 0.114793581, 0.110031891, None),
    ],
    42: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    43: [
        ("d0", "p0", "remote_prefill", 0, 2900, None, None, None),
        ("d0", "p0", "remote_prefill", 0, 2900, None, None, None),
        ("d1", None, "local_prefill:short", 16, 4, None, None, None),
        ("d1", None, "local_prefill:short", 48, 52, None, None, None),
    ],
    44: [
        ("d2", None, "local_prefill:no_prefill_replica", 0, 100, 0.086913644, 0.091480388, None),
        ("d2", None, "local_prefill:short", 0, 20, 0.086857077, 0.09157785, None),
        ("d0", None, "local_prefill:no_prefill_replica", 256, 444, 0.0829681, 0.087028662, None),
        ("d2", None, "local_prefill:no_prefill_replica", 2176, 724, 0.399024944, 0.090706858, None),
    ],
    45: [
        ("reject", "overload_ttft", 503, 1.0),
        ("d0", "p1", "remote_prefill", 256, 44, None, None, None),
        ("d0", None, "local_prefill:short", 0, 20, 0.086695788, 0.088693999, None),
        ("d1", "p2", "remote_prefill", 0, 300, None, None, None),
    ],
    46: [
        ("d1", None, "local_prefill:short", 240, 60, 0.196118987, 0.08211568, None),
        ("d0", None, "local_prefill:no_prefill_replica", 0, 700, 0.773402468, 0.069524521, None),
        ("d1", None, "local_prefill:short", 96, 4, 0.144454122, 0.082015499, None),
        ("d0", None, "local_prefill:no_prefill_replica", 0, 300, 0.404579791, 0.06943167, None),
    ],
    47: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    48: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    49: [
        ("d1", None, "local_prefill:short", 16, 4, None, None, None),
        ("d0", None, "local_prefill:short", 48, 52, None, None, None),
        ("d1", None, "local_prefill:short", 16, 4, None, None, None),
        ("d1", "p2", "remote_prefill", 64, 236, None, None, None),
    ],
    50: [
        ("d0", "p0", "remote_prefill", 0, 100, 0.094112118, 0.093064804, None),
        ("d0", "p0", "remote_prefill", 0, 100, 0.094112118, 0.093064804, None),
        ("d0", "p1", "remote_prefill", 256, 444, None, None, None),
        ("reject", "overload_ttft", 503, 5.0),
    ],
    51: [
        ("d0", None, "local_prefill:short", 16, 4, None, None, None),
        ("d0", None, "local_prefill:short", 272, 28, 0.09331719, 0.090551272, None),
        ("d2", None, "local_prefill:no_prefill_replica", 2160, 740, 0.159530142, 0.104309484, None),
        ("d0", None, "local_prefill:no_prefill_replica", 0, 700, 0.106966802, 0.0903936, None),
    ],
    52: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    53: [
        ("reject", "overload_ttft", 503, 2.0),
        ("d1", None, "local_prefill:short", 0, 20, 0.232686667, 0.116084, None),
        ("reject", "overload_ttft", 503, 2.0),
        ("reject", "overload_ttft", 503, 3.0),
    ],
    54: [
        ("d0", "p1", "remote_prefill", 608, 92, 0.122395124, 0.112941535, None),
        ("d1", "p1", "remote_prefill", 1056, 444, 0.269454297, 0.077071971, None),
        ("reject", "overload_ttft", 503, 4.0),
        ("d1", "p1", "remote_prefill", 528, 972, 1.138654877, 0.077071971, None),
    ],
    55: [
        ("d0", None, "local_prefill:no_prefill_replica", 80, 220, None, None, None),
        ("d0", None, "local_prefill:no_prefill_replica", 0, 2900, None, None, None),
        ("d0", None, "local_prefill:short", 96, 4, None, None, None),
        ("d0", None, "local_prefill:short", 16, 4, None, None, None),
    ],
    56: [
        ("reject", "overload_ttft", 503, 14.0),
        ("d1", None, "local_prefill:short", 80, 20, 0.260766667, 0.1444, 128),
        ("d0", "p0", "remote_prefill", 16, 284, None, None, None),
        ("d0", "p1", "remote_prefill", 0, 2900, None, None, None),
    ],
    57: [
        ("d0", None, "local_prefill:short", 1488, 12, 1.081003, 0.171303, None),
        ("reject", "overload_ttft", 503, 4.0),
        ("d0", None, "local_prefill:cached", 2816, 84, None, None, None),
        ("reject", "overload_ttft", 503, 1.0),
    ],
    58: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    59: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    60: [
        ("d0", "p0", "remote_prefill", 0, 300, None, None, None),
        ("reject", "overload_ttft", 503, 5.0),
        ("reject", "overload_ttft", 503, 5.0),
        ("d0", "p0", "remote_prefill", 0, 2900, 2.587714479, 0.106964, None),
    ],
    61: [
        ("d0", None, "local_prefill:short", 0, 20, None, None, None),
        ("d0", "p0", "remote_prefill", 1408, 1492, None, None, None),
        ("d0", "p0", "remote_prefill", 0, 100, None, None, None),
        ("d0", "p0", "remote_prefill", 0, 100, None, None, None),
    ],
    62: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    63: [
        ("d0", "p1", "remote_prefill", 384, 316, 0.128583152, 0.134437, None),
        ("d1", "p1", "remote_prefill", 1920, 980, 0.513096232, 0.114964, None),
        ("d1", "p1", "remote_prefill", 0, 100, 0.107113645, 0.1124, None),
        ("d1", "p1", "remote_prefill", 0, 300, 0.107495511, 0.1126, None),
    ],
    64: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    65: [
        ("d1", None, "local_prefill:short", 0, 100, 0.527433333, 0.144108, None),
        ("d1", "p0", "remote_prefill", 0, 700, 0.409511923, 0.144708, None),
        ("d1", None, "local_prefill:short", 0, 20, 0.260686667, 0.144084, None),
        ("reject", "overload_ttft", 503, 2.0),
    ],
    66: [
        ("d0", None, "local_prefill:short", 0, 20, 0.086352232, 0.089135655, None),
        ("d0", None, "local_prefill:short", 16, 4, None, None, None),
        ("d0", "p0", "remote_prefill", 80, 220, 0.866710611, 0.089010969, None),
        ("d0", None, "local_prefill:short", 640, 60, 0.086101162, 0.088727753, None),
    ],
    67: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    68: [
        ("d2", None, "local_prefill:no_prefill_replica", 1152, 348, 1.364864, 0.154928, None),
        ("d2", None, "local_prefill:short", 0, 20, 0.270050667, 0.153392, None),
        ("d2", None, "local_prefill:cached", 1408, 92, 0.511530667, 0.155164, 128),
        ("d1", None, "local_prefill:short", 256, 44, 0.349739667, 0.153137, None),
    ],
    69: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    70: [
        ("d0", None, "local_prefill:short", 272, 28, None, None, None),
        ("d1", "p0", "remote_prefill", 0, 1500, None, None, None),
        ("d1", "p2", "remote_prefill", 2176, 724, None, None, None),
        ("d0", "p1", "remote_prefill", 1536, 1364, 0.489502493, 0.103676058, None),
    ],
    71: [
        ("d0", None, "local_prefill:short", 0, 20, 0.097120574, 0.09676146, None),
        ("d1", None, "local_prefill:short", 256, 44, 0.42987006, 0.089312977, None),
        ("d0", None, "local_prefill:no_prefill_replica", 0, 700, None, None, None),
        ("d0", None, "local_prefill:short", 0, 20, 0.097120574, 0.096789272, None),
    ],
    72: [
        ("d2", None, "local_prefill:short", 16, 4, 0.546686667, 0.12032, None),
        ("d1", "p0", "remote_prefill", 1664, 1236, 0.961854306, 0.15537, None),
        ("d2", None, "local_prefill:short", 672, 28, 0.627366667, 0.120708, None),
        ("d1", None, "local_prefill:short", 64, 36, 0.322506, 0.152806, None),
    ],
    73: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    74: [
        ("d0", None, "local_prefill:short", 2864, 36, 0.328482, 0.15849, None),
        ("d0", None, "local_prefill:no_prefill_replica", 1024, 476, 1.793748667, 0.157382, None),
        ("d0", None, "local_prefill:short", 688, 12, 0.246282, 0.15629, None),
        ("d1", None, "local_prefill:no_prefill_replica", 1232, 268, 1.056833333, 0.1138, None),
    ],
    75: [
        ("d2", "p2", "remote_prefill", 896, 604, 2.200833333, 0.1378, None),
        ("d0", "p2", "remote_prefill", 640, 860, None, None, None),
        ("d1", None, "local_prefill:short", 256, 44, 1.327985667, 0.141383, None),
        ("d1", "p2", "remote_prefill", 0, 100, 0.524452333, 0.141419, None),
    ],
    76: [
        ("d0", "p1", "remote_prefill", 2048, 852, 0.823379296, 0.082762, None),
        ("d1", "p1", "remote_prefill", 0, 2900, None, None, None),
        ("d0", None, "local_prefill:short", 256, 44, 0.138662, 0.07987, None),
        ("d1", "p1", "remote_prefill", 256, 444, 0.574029265, 0.100367, None),
    ],
    77: [
        ("reject", "overload_ttft", 503, 2.0),
        ("reject", "overload_ttft", 503, 2.0),
        ("d1", None, "local_prefill:short", 0, 20, 0.240686667, 0.124084, None),
        ("d1", None, "local_prefill:short", 0, 20, 0.240686667, 0.124084, None),
    ],
    78: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    79: [
        ("d0", "p0", "remote_prefill", 80, 2820, None, None, None),
        ("d1", None, "local_prefill:short", 288, 12, None, None, None),
        ("d0", None, "local_prefill:short", 96, 4, None, None, None),
        ("d1", "p1", "remote_prefill", 0, 1500, None, None, None),
    ],
    80: [
        ("d0", "p0", "remote_prefill", 512, 188, 0.131514962, 0.124708, None),
        ("d1", "p2", "remote_prefill", 256, 44, 0.148404471, 0.136364, None),
        ("d0", "p0", "remote_prefill", 0, 100, 0.130790454, 0.124108, None),
        ("d0", "p2", "remote_prefill", 1408, 92, 0.137081935, 0.125564, None),
    ],
    81: [
        ("d1", None, "local_prefill:short", 0, 20, 0.097132384, 0.088729034, None),
        ("reject", "overload_ttft", 503, 1.0),
        ("d1", "p0", "remote_prefill", 1024, 476, 0.09571971, 0.087907597, None),
        ("d1", "p0", "remote_prefill", 0, 100, 0.096021837, 0.088691949, None),
    ],
    82: [
        ("d1", None, "local_prefill:short", 0, 20, None, None, None),
        ("d1", "p1", "remote_prefill", 1120, 380, 0.951944716, 0.065877408, None),
        ("d1", None, "local_prefill:short", 16, 4, 0.226277869, 0.065623347, None),
        ("d1", "p1", "remote_prefill", 288, 12, 0.806544788, 0.065632333, None),
    ],
    83: [
        ("reject", "overload_ttft", 503, 3.0),
        ("d1", "p0", "remote_prefill", 512, 188, 0.264999262, 0.115020635, None),
        ("reject", "overload_ttft", 503, 4.0),
        ("d1", "p2", "remote_prefill", 1664, 1236, None, None, None),
    ],
    84: [
        ("reject", "overload_ttft", 503, 5.0),
        ("reject", "overload_ttft", 503, 17.0),
        ("reject", "overload_ttft", 503, 15.0),
        ("reject", "overload_ttft", 503, 15.0),
    ],
    85: [
        ("d1", None, "local_prefill:no_prefill_replica", 560, 140, None, None, None),
        ("d1", None, "local_prefill:short", 64, 36, None, None, None),
        ("d2", None, "local_prefill:short", 96, 4, None, None, None),
        ("d1", None, "local_prefill:no_prefill_replica", 560, 940, None, None, None),
    ],
    86: [
        ("d1", "p0", "remote_prefill", 384, 316, None, None, None),
        ("reject", "overload_ttft", 503, 10.0),
        ("reject", "overload_ttft", 503, 10.0),
        ("d0", None, "local_prefill:short", 16, 4, 0.229019333, 0.16575, None),
    ],
    87: [
        ("reject", "overload_ttft", 503, 17.0),
        ("d1", None, "local_prefill:short", 1456, 44, 0.105873178, 0.108016157, None),
        ("reject", "overload_ttft", 503, 20.0),
        ("d2", "p0", "remote_prefill", 0, 100, None, None, None),
    ],
    88: [
        ("d0", "p1", "remote_prefill", 1920, 980, 0.627661, 0.135561, None),
        ("d0", "p0", "remote_prefill", 1280, 220, 0.227861, 0.133925, None),
        ("d0", None, "local_prefill:short", 640, 60, 0.195061, 0.133361, None),
        ("d0", "p0", "remote_prefill", 512, 188, 0.220661, 0.133361, None),
    ],
    89: [
        ("d1", None, "local_prefill:short", 1408, 92, 0.071331166, 0.075064392, None),
        ("d1", None, "local_prefill:cached", 1760, 1140, 0.820461204, 0.074033599, None),
        ("d1", None, "local_prefill:cached", 1488, 1412, 1.117324285, 0.074182295, None),
        ("d2", None, "local_prefill:short", 16, 4, 0.087352109, 0.092045073, None),
    ],
    90: [
        ("d2", None, "local_prefill:short", 16, 4, 0.08034221, 0.079651448, None),
        ("d2", None, "local_prefill:short", 16, 4, 0.08034221, 0.079651448, None),
        ("d0", None, "local_prefill:no_prefill_replica", 592, 108, 0.099283005, 0.091491277, None),
        ("d2", None, "local_prefill:no_prefill_replica", 1344, 1556, 1.261342733, 0.078730866, None),
    ],
    91: [
        ("d2", None, "local_prefill:short", 96, 4, None, None, None),
        ("d2", "p0", "remote_prefill", 96, 4, None, None, None),
        ("d2", "p0", "remote_prefill", 80, 220, None, None, None),
        ("d2", None, "local_prefill:cached", 2704, 196, None, None, None),
    ],
    92: [
        ("reject", "overload_ttft", 503, 1.0),
        ("d2", None, "local_prefill:short", 0, 20, 0.087918896, 0.090571133, None),
        ("d2", None, "local_prefill:short", 0, 20, None, None, None),
        ("d2", None, "local_prefill:short", 0, 20, 0.087918896, 0.090599917, None),
    ],
    93: [
        ("reject", "decode_throttled", 429, 1.0),
        ("reject", "overload_ttft", 503, 14.0),
        ("d1", None, "local_prefill:short", 256, 44, None, None, None),
        ("reject", "overload_ttft", 503, 4.0),
    ],
    94: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    95: [
        ("d0", None, "local_prefill:no_prefill_replica", 544, 956, None, None, None),
        ("d1", None, "local_prefill:short", 176, 124, 1.011273667, 0.124615, None),
        ("d0", None, "local_prefill:short", 688, 12, 0.2107, 0.120764, None),
        ("d1", None, "local_prefill:short", 64, 236, 1.384607, 0.124671, None),
    ],
    96: [
        ("reject", "overload_ttft", 503, 2.0),
        ("d0", "p2", "remote_prefill", 0, 100, 0.501758333, 0.118489, None),
        ("reject", "overload_ttft", 503, 2.0),
        ("d0", "p1", "remote_prefill", 1408, 92, 1.953158333, 0.119833, None),
    ],
    97: [
        ("d1", "p1", "remote_prefill", 256, 1244, None, None, None),
        ("d1", "p0", "remote_prefill", 0, 700, None, None, None),
        ("d0", None, "local_prefill:short", 16, 4, None, None, None),
        ("d0", "p0", "remote_prefill", 416, 1084, None, None, None),
    ],
    98: [
        ("reject", "overload_ttft", 503, 19.0),
        ("d1", None, "local_prefill:no_prefill_replica", 128, 172, None, None, None),
        ("reject", "overload_ttft", 503, 19.0),
        ("reject", "overload_ttft", 503, 18.0),
    ],
    99: [
        ("d0", None, "local_prefill:short", 256, 44, 0.312966667, 0.1166, None),
        ("d1", None, "local_prefill:short", 256, 44, None, None, None),
        ("d1", "p0", "remote_prefill", 256, 444, None, None, None),
        ("d0", "p0", "remote_prefill", 1280, 220, None, None, None),
    ],
    100: [
        ("d1", "p1", "remote_prefill", 736, 764, 0.2703, 0.067564, None),
        ("d1", "p1", "remote_prefill", 96, 2804, 0.6797, 0.0692, None),
        ("d1", None, "local_prefill:short", 1488, 12, 0.1199, 0.067508, None),
        ("d0", None, "local_prefill:short", 0, 20, 0.457879, 0.067487, None),
    ],
    101: [
        ("reject", "overload_ttft", 503, 1.0),
        ("reject", "overload_ttft", 503, 1.0),
        ("d2", None, "local_prefill:short", 176, 124, None, None, None),
        ("d1", "p1", "remote_prefill", 224, 476, None, None, None),
    ],
    102: [
        ("d2", None, "local_prefill:cached", 2656, 244, 1.221955031, 0.106778363, None),
        ("d2", "p0", "remote_prefill", 192, 108, 0.51262458, 0.107745924, None),
        ("d1", None, "local_prefill:short", 288, 12, None, None, None),
        ("d0", "p0", "remote_prefill", 0, 700, None, None, None),
    ],
    103: [
        ("d2", None, "local_prefill:short", 256, 44, None, None, None),
        ("d1", "p0", "remote_prefill", 0, 100, None, None, None),
        ("d2", "p0", "remote_prefill", 256, 444, None, None, None),
        ("d1", None, "local_prefill:short", 0, 20, None, None, None),
    ],
    104: [
        ("d1", None, "local_prefill:short", 2880, 20, 0.888546659, 0.098654053, None),
        ("reject", "overload_ttft", 503, 2.0),
        ("reject", "overload_ttft", 503, 4.0),
        ("d0", "p0", "remote_prefill", 0, 300, 1.120952321, 0.073308359, None),
    ],
    105: [
        ("reject", "overload_ttft", 503, 16.0),
        ("reject", "overload_ttft", 503, 5.0),
        ("reject", "overload_ttft", 503, 16.0),
        ("reject", "overload_ttft", 503, 16.0),
    ],
    106: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    107: [
        ("d0", None, "local_prefill:short", 288, 12, 0.2223, 0.1326, None),
        ("d1", None, "local_prefill:short", 1280, 220, 0.920833333, 0.1378, None),
        ("d0", None, "local_prefill:short", 1296, 204, 0.8635, 0.1338, None),
        ("d2", "p0", "remote_prefill", 0, 700, 0.236712564, 0.112764, None),
    ],
    108: [
        ("d1", None, "local_prefill:no_prefill_replica", 208, 92, None, None, None),
        ("d1", None, "local_prefill:cached", 2768, 132, None, None, None),
        ("d1", None, "local_prefill:short", 96, 4, None, None, None),
        ("d2", None, "local_prefill:short", 48, 52, 0.371433333, 0.148164, None),
    ],
    109: [
        ("d0", None, "local_prefill:short", 0, 20, None, None, None),
        ("d0", "p2", "remote_prefill", 384, 2516, None, None, None),
        ("d0", "p1", "remote_prefill", 2304, 596, None, None, None),
        ("d0", None, "local_prefill:short", 0, 20, None, None, None),
    ],
    110: [
        ("d0", "p0", "remote_prefill", 512, 188, 0.777100636, 0.106943017, None),
        ("d0", None, "local_prefill:short", 0, 20, 0.198516149, 0.107337218, None),
        ("d0", None, "local_prefill:short", 0, 20, 0.198516149, 0.107167943, None),
        ("d0", "p0", "remote_prefill", 0, 700, 2.483767303, 0.106773743, None),
    ],
    111: [
        ("reject", "overload_ttft", 503, 2.0),
        ("d0", "p1", "remote_prefill", 2464, 436, 0.094500666, 0.089237441, None),
        ("reject", "overload_ttft", 503, 2.0),
        ("reject", "overload_ttft", 503, 2.0),
    ],
    112: [
        ("d2", "p0", "remote_prefill", 128, 1372, 0.392902555, 0.066047588, None),
        ("d2", None, "local_prefill:short", 256, 44, 2.405342817, 0.065824413, None),
        ("d2", None, "local_prefill:short", 640, 60, 2.415787192, 0.065898805, None),
        ("d2", None, "local_prefill:short", 0, 20, 2.389738902, 0.065782754, None),
    ],
    113: [
        ("d0", None, "local_prefill:short", 96, 4, None, None, None),
        ("d1", None, "local_prefill:short", 624, 76, None, None, None),
        ("d0", "p0", "remote_prefill", 0, 2900, None, None, None),
        ("reject", "overload_ttft", 503, 2.0),
    ],
    114: [
        ("reject", "overload_ttft", 503, 1.0),
        ("reject", "overload_ttft", 503, 2.0),
        ("reject", "overload_ttft", 503, 1.0),
        ("reject", "overload_ttft", 503, 1.0),
    ],
    115: [
        ("d0", None, "local_prefill:no_prefill_replica", 384, 316, None, None, None),
        ("d0", None, "local_prefill:no_prefill_replica", 384, 2516, None, None, None),
        ("d0", None, "local_prefill:no_prefill_replica", 640, 860, None, None, None),
        ("d0", None, "local_prefill:no_prefill_replica", 640, 860, None, None, None),
    ],
    116: [
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
        ("reject", "no_decode_replica", 503, 5.0),
    ],
    117: [
        ("d0", None, "local_prefill:no_prefill_replica", 0, 2900, 3.028243323, 0.09843718, None),
        ("d0", None, "local_prefill:no_prefill_replica", 0, 1500, 1.576379293, 0.099216965, None),
        ("d0", None, "local_prefill:short", 688, 12, 0.088596428, 0.099713614, None),
        ("d0", None, "local_prefill:short", 1488, 12, None, None, None),
    ],
    118: [
        ("d0", None, "local_prefill:no_prefill_replica", 128, 1372, 0.608134, 0.089798, None),
        ("d0", None, "local_prefill:no_prefill_replica", 0, 100, 0.352334, 0.088342, None),
        ("d0", None, "local_prefill:short", 688, 12, 0.335334, 0.088998, None),
        ("d0", None, "local_prefill:no_prefill_replica", 928, 1972, None, None, None),
    ],
    119: [
        ("reject", "overload_ttft", 503, 1.0),
        ("reject", "overload_ttft", 503, 1.0),
        ("reject", "overload_ttft", 503, 1.0),
        ("reject", "overload_ttft", 503, 2.0),
    ],
}
