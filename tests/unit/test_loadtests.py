import os
from pathlib import Path

import pytest

from kvtransfer.stats import percentile
from loadtests import workloads
from loadtests.client import RequestRecord
from loadtests.stats import dist, summarize


class TestWorkloads:
    @pytest.mark.parametrize("name", sorted(workloads.WORKLOADS))
    def test_seeded_and_bounded(self, name):
        a = workloads.build(name, seed=3, n=40, rate=2.0, minute_s=20.0)
        b = workloads.build(name, seed=3, n=40, rate=2.0, minute_s=20.0)
        assert a == b and 0 < len(a) <= 40
        assert all(s.max_tokens > 0 and s.messages for s in a)
        assert [s.arrival_s for s in a] == sorted(s.arrival_s for s in a)

    def test_poisson_rate(self):
        import random

        t = workloads.poisson_arrivals(random.Random(0), rate=4.0, n=4000)
        assert 3.7 < len(t) / t[-1] < 4.3

    def test_bursty_triples(self):
        import random

        sched = workloads.bursty_schedule(1.0, minute_s=60)
        t = workloads.schedule_arrivals(random.Random(1), sched, n=10_000)
        base = sum(1 for x in t if x < 30) / 30
        peak = sum(1 for x in t if 45 <= x < 105) / 60
        assert 2.2 < peak / base < 4.0

    def test_shared_prefix_grows_history(self):
        specs = workloads.build("shared-prefix", seed=0, n=60, rate=5.0, num_users=3)
        assert {s.tag for s in specs} <= {"system-0", "system-1", "system-2"}
        assert max(len(s.messages) for s in specs) > 3 and all(s.messages[0]["role"] == "system" for s in specs)

    def test_qos_tiers(self):
        specs = workloads.build("qos", seed=0, n=300, rate=5.0)
        share = sum(s.headers["x-customer-tier"] == "free" for s in specs) / len(specs)
        assert 0.5 < share < 0.7
        fixed = workloads.build("qos", seed=0, n=20, rate=5.0, base="random")
        assert {s.max_tokens for s in fixed} == {64} and all(s.tag == s.headers["x-customer-tier"] for s in fixed)
        with pytest.raises(ValueError):
            workloads.build("qos", seed=0, n=1, rate=1.0, base="bursty")

    def test_unknown(self):
        with pytest.raises(ValueError):
            workloads.build("nope", seed=0, n=1, rate=1)


class TestStats:
    def test_one_percentile_definition_linear_between_ranks(self):
        # linear interpolation between the two closest ranks (numpy's default), in the product and the reports
        assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([], 50) is None
        assert percentile([10, 20], 90) == pytest.approx(19.0) and percentile([4, 1, 3, 2], 0) == 1
        d = dist([4.0, 1.0, 3.0, 2.0])
        assert (d["p50"], d["p90"], d["p99"], d["mean"], d["n"]) == pytest.approx((2.5, 3.7, 3.97, 2.5, 4))
        assert dist([]) == {"p50": None, "p90": None, "p99": None, "mean": None, "n": 0}

    def test_goodput_counts_only_slo_meeting_requests(self):
        recs = [
            RequestRecord(0, 200, ttft_s=0.1, e2e_s=1.0, completion_tokens=10),  # tpot 0.1: good
            RequestRecord(0, 200, ttft_s=3.0, e2e_s=4.0, completion_tokens=10),  # ttft miss
            RequestRecord(0, 200, ttft_s=0.1, e2e_s=9.1, completion_tokens=10),  # tpot 1.0 miss
            RequestRecord(0, 503, outcome="rejected", reason="overloaded"),
        ]
        s = summarize(recs, duration_s=2.0, ttft_slo_s=2.0, tpot_slo_s=0.2)
        assert s["ok"] == 3 and s["goodput_rps"] == 0.5 and s["rejected"] == {"overloaded": 1}
        assert s["slo_attainment"] == 0.25

    def test_per_tier_summaries_and_report_table(self, tmp_path):
        from loadtests import report
        from loadtests.stats import summarize_by_tag

        def recs(premium_ttft):
            return [
                RequestRecord(0, 200, ttft_s=premium_ttft, e2e_s=premium_ttft + 1, completion_tokens=10, tag="premium"),
                RequestRecord(0, 200, ttft_s=1.0, e2e_s=2.0, completion_tokens=10, tag="free"),
                RequestRecord(0, 429, outcome="rejected", reason="tier_quota", tag="free"),
            ]

        by = summarize_by_tag(recs(0.5), duration_s=10.0, ttft_slo_s=4.0, tpot_slo_s=0.25)
        assert sorted(by) == ["free", "premium"] and (by["free"]["ok"], by["free"]["requests"]) == (1, 2)
        assert by["premium"]["ttft_s"]["p50"] == 0.5 and by["free"]["rejected"] == {"tier_quota": 1}
        rows = []
        for system, ttft in (("prio", 0.5), ("fcfs", 2.0)):
            whole = summarize(recs(ttft), 10.0, 4.0, 0.25)
            rows.append(
                {
                    **whole,
                    "system": system,
                    "workload": "qos",
                    "rate": 1.0,
                    "server_rss_bytes": 1 << 30,
                    "by_tier": summarize_by_tag(recs(ttft), 10.0, 4.0, 0.25),
                }
            )
        (tmp_path / "raw").mkdir()
        report.write_report(
            tmp_path, rows, {"run_id": "t", "slo": {"ttft_s": 4.0, "tpot_s": 0.25}, "baselines": ["fcfs"]}
        )
        md = (tmp_path / "report.md").read_text()
        assert "| prio | qos | 1.0 | premium | 1/1 | 0 |" in md
        assert "| prio | qos | 1.0 | premium | 1.00x | 1.00x | 0.25x | 0.25x |" in md  # premium TTFT 0.5 vs 2 s


class TestTimeline:
    OURS = """# TYPE pdserve_pool_queue_depth gauge
pdserve_pool_queue_depth{pool="prefill",role="prefill"} 3.0
pdserve_pool_queue_depth{pool="decode",role="decode"} 1.0
# TYPE pdserve_pool_running_requests gauge
pdserve_pool_running_requests{pool="prefill",role="prefill"} 2.0
# TYPE pdserve_pool_replicas gauge
pdserve_pool_replicas{pool="prefill",role="prefill"} 1.0
pdserve_pool_replicas{pool="decode",role="decode"} 2.0
# TYPE pdserve_requests counter
pdserve_requests_total{route="chat",status="200"} 5.0
"""
    VLLM = """# TYPE vllm:num_requests_waiting gauge
vllm:num_requests_waiting{engine="0",model_name="m"} 4.0
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 7.0
"""

    def test_parse_ours_and_vllm(self):
        from loadtests.timeline import parse_sample

        assert parse_sample(self.OURS) == {
            "queue": 4.0,
            "running": 2.0,
            "replicas": 3.0,
            "decode_replicas": 2.0,
            "prefill_replicas": 1.0,
        }
        assert parse_sample(self.VLLM) == {"queue": 4.0, "running": 7.0}
        assert parse_sample("") == {}

    def test_parse_replicas_by_role_and_fallbacks_from_the_real_exposition(self):
        """What the ingress renders (serve.metrics): counters are exposed as ``..._total`` (the parser
        names their family without it) next to ``..._created`` gauges, which are no values."""
        from loadtests.timeline import parse_sample
        from serve.metrics import ClusterMetrics
        from workers.messages import WorkerStats

        stats = [
            WorkerStats(endpoint_id="p1", pool="prefill", role="prefill"),
            WorkerStats(endpoint_id="d1", pool="decode", role="decode"),
            WorkerStats(endpoint_id="d2", pool="decode", role="decode", healthy=False),
        ]
        metrics = ClusterMetrics(lambda: stats)
        before = parse_sample(metrics.render().decode())
        assert (before["decode_replicas"], before["prefill_replicas"], before["replicas"]) == (1.0, 1.0, 2.0)
        assert (before["decode_retries"], before["prefill_fallbacks"]) == (0.0, 0.0)  # no label set yet
        metrics.prefill_fallbacks.labels("decode_retry").inc(2)
        metrics.prefill_fallbacks.labels("timeout").inc()
        after = parse_sample(metrics.render().decode())
        assert (after["decode_retries"], after["prefill_fallbacks"]) == (2.0, 3.0)

    def test_parse_health_replicas_and_targets_from_a_recorded_body(self):
        import json
        from pathlib import Path

        from loadtests.timeline import parse_health

        body = json.loads((Path(__file__).parent / "data" / "health_autoscale_flex.json").read_text())
        assert parse_health(body) == {
            "replicas.prefill": 1.0,
            "replicas.decode": 2.0,
            "replicas.mixed": 2.0,
            "target.decode": 2.0,  # only the autoscaled pool has a target
        }
        assert parse_health({"status": "unavailable"}) == {}

    def test_replica_seconds_integrate_each_pools_replicas_over_the_timeline(self):
        from loadtests.timeline import replica_seconds

        tl = [
            {"t": 0.0, "replicas.decode": 1.0, "replicas.prefill": 1.0, "target.decode": 2.0},
            {"t": 10.0, "replicas.decode": 2.0, "replicas.prefill": 1.0},
            {"t": 15.0, "replicas.decode": 1.0, "replicas.prefill": 1.0},
            {"t": 20.0, "queue": 3.0},  # a sample without /health fields ends the last interval
        ]
        rs = replica_seconds(tl)
        assert rs == pytest.approx({"decode": 10 + 10 + 5, "prefill": 20.0, "total": 45.0})
        assert replica_seconds([{"t": 0.0, "queue": 1.0}]) == {}

    def test_prefix_cache_hit_rate_between_scrapes(self):
        from loadtests.timeline import prefix_cache_counters, prefix_cache_hit_rate

        def ours(hit, computed):
            return (
                "# TYPE pdserve_engine_prompt_tokens counter\n"
                f'pdserve_engine_prompt_tokens_total{{pool="d",endpoint="a",source="local_cache_hit"}} {hit}\n'
                f'pdserve_engine_prompt_tokens_total{{pool="d",endpoint="a",source="local_compute"}} {computed}\n'
                'pdserve_engine_prompt_tokens_total{pool="d",endpoint="a",source="external_kv_transfer"} 999\n'
            )

        assert prefix_cache_counters(ours(10, 30)) == (10.0, 40.0)
        assert prefix_cache_hit_rate(ours(10, 30), ours(70, 50)) == pytest.approx(60 / 80)
        vllm = (
            '# TYPE vllm:prefix_cache_hits counter\nvllm:prefix_cache_hits_total{engine="0"} 5\n'
            '# TYPE vllm:prefix_cache_queries counter\nvllm:prefix_cache_queries_total{engine="0"} 20\n'
        )
        assert prefix_cache_counters(vllm) == (5.0, 20.0)
        assert prefix_cache_hit_rate("", "") is None


class TestBenchConfig:
    def test_slo_comes_from_the_config(self, tmp_path):
        from loadtests.bench import config_defaults
        from serve.config import DEFAULT_CONFIG

        assert config_defaults(str(DEFAULT_CONFIG)) == {"ttft_slo": 4.0, "tpot_slo": 0.25}
        p = tmp_path / "c.yaml"  # an overlay: the SLO of its base unless it sets one
        p.write_text("base: default\nrouter: {slo: {tpot_ms: 200}}\n")
        assert config_defaults(str(p)) == {"ttft_slo": 4.0, "tpot_slo": 0.2}
        p.write_text("model: {name: m}\npools: [{name: d, role: decode, device: {kind: cpu, cpu_cores: '0'}}]\n")
        assert config_defaults(str(p)) == {"ttft_slo": 2.0, "tpot_slo": 0.2}

    def test_set_overrides_edit_a_copy_of_the_config(self, tmp_path):
        import yaml

        from loadtests.bench import edited_config
        from serve.config import DEFAULT_CONFIG, ClusterConfig

        assert edited_config(str(DEFAULT_CONFIG), [], "x", tmp_path) == str(DEFAULT_CONFIG)
        path = edited_config(str(DEFAULT_CONFIG), ["pools.0.replicas=3"], "x", tmp_path)
        assert path == str(tmp_path / "configs" / "x.yaml")
        edited = yaml.safe_load(Path(path).read_text())
        assert edited["pools"][0]["replicas"]["min"] == edited["pools"][0]["replicas"]["max"] == 3
        assert edited["model"] == yaml.safe_load(Path(DEFAULT_CONFIG).read_text())["model"]
        assert ClusterConfig.from_yaml(path) == ClusterConfig.from_yaml(DEFAULT_CONFIG, ["pools.0.replicas=3"])
        from tests.conftest import REPO

        overlay = str(REPO / "configs" / "bench" / "two-decode.yaml")  # --set edits the resolved overlay
        path = edited_config(overlay, ["pools.1.device.cpu_cores=['1', '1']"], "y", tmp_path)
        assert ClusterConfig.from_yaml(path).pools[1].device.cpu_cores == ["1", "1"]
        with pytest.raises(SystemExit, match="does not name a place"):
            edited_config(str(DEFAULT_CONFIG), ["pools.5.replicas=1"], "z", tmp_path)


class TestSweep:
    def _summary(self, run_id, hits, ttfts):
        rows = [
            {"system": s, "workload": "w", "prefix_cache_hit_rate": h, "ttft_s": {"p50": t}, "goodput_rps": 0.5}
            for s, h, t in zip(("rr", "prefix"), hits, ttfts)
        ]
        return {"meta": {"run_id": run_id, "args": {"seed": 0, "overrides": ["a.b=1"]}}, "rows": rows}

    def test_ratios_per_point_and_plot(self, tmp_path):
        from loadtests.sweep import plot, sweep_points

        pts = [
            ("32", self._summary("a", (0.4, 0.6), (2.0, 1.0))),
            ("24", self._summary("b", (0.25, 0.5), (2.0, 1.2))),
            ("24", self._summary("c", (0.3, 0.6), (2.0, 1.0))),
        ]
        entries = sweep_points(pts, "prefix", "rr", "w")
        assert [e["prefix_cache_hit_rate"]["ratio"] for e in entries] == pytest.approx([1.5, 2.0, 2.0])
        assert [e["ttft_p50"]["ratio"] for e in entries] == pytest.approx([0.5, 0.6, 0.5])
        assert entries[0]["overrides"] == ["a.b=1"] and entries[0]["goodput_rps"]["ratio"] == 1.0
        assert plot(entries, "blocks", "prefix", "rr", tmp_path / "s.png").stat().st_size > 5000
        with pytest.raises(SystemExit):
            sweep_points(pts, "prefix", "rr", "other-workload")


class TestReport:
    """Report + plots from synthetic rows (fake records: this tests the report code, not a server)."""

    def _row(self, system, wl, rate, goodput):
        d = {"p50": 0.1, "p90": 0.2, "p99": 0.3, "mean": 0.1, "n": 3}
        return {
            "system": system,
            "workload": wl,
            "rate": rate,
            "ok": 3,
            "requests": 3,
            "rejected": {},
            "errors": {},
            "goodput_rps": goodput,
            "output_tps": 10.0,
            "ttft_s": d,
            "itl_s": d,
            "tpot_s": d,
            "server_rss_bytes": 1 << 30,
        }

    def test_ratios_and_bursty_timeline(self, tmp_path):
        import json

        from loadtests import report

        rows = [self._row("ours", "bursty", 0.5, 0.4), self._row("colocated", "bursty", 0.5, 0.2)]
        (tmp_path / "raw").mkdir()
        for system in ("ours", "colocated"):
            recs = [
                RequestRecord(float(i), 200, ttft_s=0.5, e2e_s=2.0, itl_s=[0.1], completion_tokens=8).to_dict()
                for i in range(20)
            ]
            recs.append(RequestRecord(10.0, 503, outcome="rejected", reason="overloaded").to_dict())
            tl = [{"t": float(t), "queue": t % 3, "running": 1.0, "replicas": 2.0} for t in range(25)]
            if system == "ours":  # /health samples: replicas per pool, the planner's target, flex roles
                for x in tl:
                    up = 10 <= x["t"] < 20
                    x.update({"replicas.decode": 1.0 + up, "target.decode": 2.0 if up else 1.0, "flex_decode": 1.0})
            (tmp_path / "raw" / f"{system}-bursty-0.5.json").write_text(json.dumps({"records": recs, "timeline": tl}))
        report.write_report(tmp_path, rows, {"run_id": "t", "slo": {"ttft_s": 4.0, "tpot_s": 0.25}})
        md = (tmp_path / "report.md").read_text()
        assert "| bursty | 0.5 | 2.00x |" in md
        for png in ("goodput-bursty.png", "cdf-bursty-0.5.png", "timeline-bursty-0.5.png"):
            assert (tmp_path / png).stat().st_size > 5000

    def test_replica_seconds_ratio_in_the_report(self, tmp_path):
        from loadtests import report

        a, b = self._row("auto", "random", 1.0, 0.9), self._row("fixed", "random", 1.0, 1.0)
        a["replica_seconds"], b["replica_seconds"] = {"total": 150.0}, {"total": 200.0}
        meta = {"run_id": "t", "slo": {"ttft_s": 4.0, "tpot_s": 0.25}, "baselines": ["fixed"]}
        report.write_report(tmp_path, [a, b], meta)
        md = (tmp_path / "report.md").read_text()
        assert "| random | 1.0 | 0.90x |" in md and "| 0.75x |" in md

    def test_a_peer_named_as_baseline_gets_one_table(self, tmp_path):
        from loadtests import report

        rows = [self._row("ours", "random", 1.0, 0.9), self._row("colocated", "random", 1.0, 1.0)]
        meta = {"run_id": "t", "slo": {"ttft_s": 4.0, "tpot_s": 0.25}, "baselines": ["colocated"]}
        report.write_report(tmp_path, rows, meta)
        assert (tmp_path / "report.md").read_text().count("## ours vs colocated") == 1


class TestBenchArgs:
    def test_workload_options_and_seeds(self):
        from loadtests.bench import parse_system, parse_workload, run_seed

        assert parse_workload("bursty:n=80,minute_s=30.5") == ("bursty", {"n": 80, "minute_s": 30.5})
        assert parse_workload("qos:base=random") == ("qos", {"base": "random"})
        assert parse_workload("random", smoke=True) == ("random", {"input_tokens": 256, "output_tokens": 16})
        assert len({run_seed(0, w, r) for w in range(3) for r in range(4)}) == 12
        assert parse_system("ours", "c.yaml") == ("ours", "ours", "c.yaml")
        assert parse_system("old=ours@x.yaml", "c.yaml") == ("old", "ours", "x.yaml")
        with pytest.raises(SystemExit):
            parse_system("colocated@x.yaml", "c.yaml")

    def test_url_benchmarks_one_running_server(self):
        from loadtests.bench import parse_args

        a = parse_args(["--smoke", "--url", "http://127.0.0.1:8000"])
        assert (a.url, a.systems, a.requests) == ("http://127.0.0.1:8000", "ours", 8)
        assert parse_args(["--url", "http://h:1", "--systems", "prod"]).systems == "prod"
        with pytest.raises(SystemExit):
            parse_args(["--url", "http://h:1", "--systems", "ours,colocated"])

    def test_workload_labels_keep_two_shapes_apart(self):
        from loadtests.bench import workload_labels

        assert workload_labels(
            [
                "random:input_tokens=256,output_tokens=128",
                "random:input_tokens=512,output_tokens=64",
                "shared-prefix",
                "bursty:n=80,output_tokens=32",
            ]
        ) == ["random-256-128", "random-512-64", "shared-prefix", "bursty"]  # a name used once keeps it
        assert workload_labels(["random:n=10", "random:n=20,input_tokens=64"]) == ["random", "random-64"]
        assert workload_labels(["random"], smoke=True) == ["random"]

    def test_vs_vllm_preset_runs_every_peer_on_the_issue_workloads(self):
        from loadtests.bench import parse_args, parse_workload

        a = parse_args(["--vs-vllm"])
        assert a.systems.split(",") == ["ours", "colocated", "raypd"] and a.requests == 40
        shapes = {(w, kw.get("input_tokens"), kw.get("output_tokens")) for w, kw in map(parse_workload, a.workloads)}
        assert {("random", 256, 128), ("random", 512, 64), ("shared-prefix", None, None)} <= shapes
        assert any(w == "bursty" for w, _, _ in shapes)
        assert len(a.rates) == len(a.workloads) and {"0.25", "0.5", "1"} <= set(a.rates[0].split(","))
        with pytest.raises(SystemExit):
            parse_args(["--vs-vllm", "--workload", "random"])


def test_server_session_is_deprioritised_against_the_client():
    import subprocess
    import sys

    from loadtests.systems import SERVER_AUTOGROUP_NICE, lower_session_priority

    assert Path("/proc/self/autogroup").exists(), "needs Linux scheduler autogroups (CONFIG_SCHED_AUTOGROUP)"
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"], start_new_session=True)
    try:
        path = Path(f"/proc/{child.pid}/autogroup")
        assert lower_session_priority(child.pid)
        assert path.read_text().strip().endswith(f"nice {SERVER_AUTOGROUP_NICE}")
        assert Path(f"/proc/{os.getpid()}/autogroup").read_text() != path.read_text()  # ours untouched
    finally:
        child.kill()
        child.wait()
    assert not lower_session_priority(child.pid)  # a process that is gone: a no-op, reported


def test_recorded_paths_are_portable():
    from loadtests.bench import REPO, portable

    assert portable(str(REPO / "serve" / "default.yaml")) == "serve/default.yaml"
    assert portable("/somewhere/else/run") == "run" and portable(0.5) == 0.5


def test_recorded_results_name_no_machine_paths():
    import json

    results = Path(__file__).resolve().parents[2] / "loadtests" / "results"

    def strings(v):
        if isinstance(v, dict):
            for x in v.values():
                yield from strings(x)
        elif isinstance(v, list):
            for x in v:
                yield from strings(x)
        elif isinstance(v, str):
            yield v

    summaries = sorted(results.glob("*/summary.json"))
    assert summaries, f"no recorded results under {results}"
    for summary in summaries:
        bad = [s for s in strings(json.loads(summary.read_text())) if s.startswith("/")]
        assert not bad, (summary.parent.name, bad[:3])


class TestConversations:
    def test_multi_turn_is_seeded_and_sized(self):
        a = workloads.build("multi-turn", seed=3, n=40, rate=2.0, turns=6)
        assert a == workloads.build("multi-turn", seed=3, n=40, rate=2.0, turns=6)
        assert [len(c.user_turns) for c in a] == [6] * 6 + [4]  # 40 requests
        assert all(len(c.think_s) == len(c.user_turns) - 1 for c in a)
        assert [c.arrival_s for c in a] == sorted(c.arrival_s for c in a)
        assert workloads.is_closed_loop("multi-turn") and not workloads.is_closed_loop("shared-prefix")
        # rate stays the offered request rate: conversations start at rate / turns
        many = workloads.build("multi-turn", seed=1, n=6000, rate=3.0, turns=6)
        assert 0.45 < len(many) / many[-1].arrival_s < 0.55

    def test_turn_messages_carry_the_actual_answers(self):
        from loadtests.closedloop import turn_messages, turn_tag

        conv = workloads.Conversation(0.0, "sys", ("u0", "u1", "u2"), (0.0, 0.0), 8, tag="system-1")
        assert turn_messages(conv, []) == [{"role": "system", "content": "sys"}, {"role": "user", "content": "u0"}]
        msgs = turn_messages(conv, ["a0", "a1"])
        assert [m["content"] for m in msgs] == ["sys", "u0", "a0", "u1", "a1", "u2"]
        assert [m["role"] for m in msgs[1:]] == ["user", "assistant"] * 2 + ["user"]
        assert turn_tag(3, 2, conv) == "c3/t2/system-1"

    def test_sse_data_takes_data_lines_only(self):
        from loadtests.client import SSE_DONE, sse_data

        assert sse_data('data: {"a": 1}') == '{"a": 1}' and sse_data(b"data: [DONE]") == SSE_DONE
        assert sse_data("") is None and sse_data(": keep-alive") is None

    def test_text_is_not_recorded(self):
        assert "text" not in RequestRecord(0.0, 200, text="hello").to_dict()


class TestServingCpu:
    def test_variant_parsing(self):
        from loadtests.micro.serving_cpu import parse_variant

        assert parse_variant("direct") == ("direct", [], {})
        assert parse_variant("proxy:server.direct_ingress=false,env.RAY_SERVE_X=0,router.policy=round-robin") == (
            "proxy",
            ["server.direct_ingress=false", "router.policy=round-robin"],
            {"RAY_SERVE_X": "0"},
        )

    def test_serving_groups_leave_engines_out_and_keep_the_total(self):
        from loadtests.micro.serving_cpu import serving_groups

        kinds = {
            "replica ingress": 0.9,
            "ray::ProxyActor": 0.6,
            "replica pool-decode": 0.4,
            "replica pool-prefill": 0.1,
            "raylet": 0.05,
            "VLLM::EngineCore (of replica pool-decode)": 3.8,
        }
        groups = serving_groups(kinds)
        assert groups == {
            "ingress replica": 0.9,
            "Serve HTTP proxy": 0.6,
            "engine replicas (Ray/Serve side)": 0.5,
            "other": 0.05,
        }

    def test_client_stats_in_milliseconds(self):
        from loadtests.client import RequestRecord
        from loadtests.micro.serving_cpu import client_stats

        ok = RequestRecord(start_s=0.0, outcome="ok", ttft_s=0.5, itl_s=[0.01, 0.03], completion_tokens=3)
        refused = RequestRecord(start_s=0.0, outcome="rejected", reason="overload_ttft")
        stats = client_stats([ok, refused])
        assert (stats["requests"], stats["ok"], stats["tokens"], stats["events_per_request"]) == (2, 1, 3, 3.0)
        assert stats["errors"] == {"overload_ttft": 1}
        assert (stats["ttft_ms_p50"], stats["event_gap_ms_p50"], stats["event_gap_ms_p99"]) == (500.0, 20.0, 29.8)
        assert client_stats([refused])["ttft_ms_p99"] is None
