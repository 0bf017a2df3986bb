"""The fault run's pure parts (loadtests/faults/faults_run.py) on hand-written fake records and timelines,
its config and CLI, and the fault helpers' per-replica engine lookup on stand-in processes. No
cluster: the run itself starts one."""

import subprocess
import time
from pathlib import Path

import psutil
import pytest

from loadtests.client import RequestRecord
from loadtests.faults import faults
from loadtests.faults.faults_run import (
    analyse,
    classify,
    fault_targets,
    outcome_counts,
    parse_args,
    phase_of,
    plot_timeline,
    replica_restored_s,
    stopped_using_dead_s,
    throughput_recovered_s,
    write_report,
)

REPO = Path(__file__).resolve().parents[2]
MAX = 128
FAKE_FAULTS = {"kill_s": 60.0, "pause_start_s": 120.0, "pause_end_s": 130.0, "decode_replicas_before": 2}


def fake_ok(start_s: float, e2e_s: float = 10.0, tokens: int = MAX) -> RequestRecord:
    return RequestRecord(start_s, 200, ttft_s=0.5, e2e_s=e2e_s, completion_tokens=tokens)


def fake_rejected(start_s: float) -> RequestRecord:
    return RequestRecord(start_s, 503, outcome="rejected", reason="no_decode_capacity")


def fake_error(start_s: float, e2e_s: float | None = None) -> RequestRecord:
    return RequestRecord(start_s, 200, outcome="error", reason="decode_failed", e2e_s=e2e_s)


def fake_hung(start_s: float) -> RequestRecord:
    return RequestRecord(start_s, outcome="error", reason="client_timeout")


def fake_timeline(**series: dict[float, float]) -> list[dict]:
    """One sample per second 0..200; ``series``: field -> {time from which: value}."""

    def value(changes, t):
        return [v for since, v in sorted(changes.items()) if since <= t][-1]

    return [{"t": float(t), **{k: value(ch, t) for k, ch in series.items()}} for t in range(201)]


class TestClassify:
    def test_categories(self):
        assert classify(fake_ok(1.0), MAX) == "completed"
        assert classify(fake_ok(1.0, tokens=MAX - 1), MAX) == "truncated"
        assert classify(fake_ok(1.0, tokens=0), MAX) == "truncated"
        assert classify(fake_rejected(1.0), MAX) == "rejected"
        assert classify(RequestRecord(1.0, 429, outcome="rejected", reason="rate_limited"), MAX) == "rejected"
        assert classify(fake_error(1.0), MAX) == "error"
        assert classify(RequestRecord(1.0, 0, outcome="error", reason="RemoteProtocolError"), MAX) == "error"
        assert classify(fake_hung(1.0), MAX) == "hung"

    def test_phases_by_arrival(self):
        assert [phase_of(t, FAKE_FAULTS) for t in (0.0, 59.9, 60.0, 119.9, 120.0, 129.9, 130.0, 500.0)] == [
            "before_kill",
            "before_kill",
            "kill_to_pause",
            "kill_to_pause",
            "pause",
            "pause",
            "after_pause",
            "after_pause",
        ]

    def test_counts(self):
        recs = [fake_ok(1.0), fake_ok(2.0, tokens=5), fake_rejected(3.0), fake_error(4.0), fake_hung(5.0)]
        assert outcome_counts(recs, MAX) == {
            "sent": 5,
            "completed": 1,
            "failed": 2,
            "rejected_503_429": 1,
            "error": 1,
            "hung": 1,
            "truncated": 1,
        }


class TestTimings:
    def test_stopped_using_dead_replica(self):
        tl = fake_timeline(decode_retries={0: 1.0, 62: 3.0, 65: 4.0})  # a retry before the kill does not count
        assert stopped_using_dead_s(tl, 60.0) == 5.0
        assert stopped_using_dead_s(fake_timeline(decode_retries={0: 1.0, 30: 2.0}), 60.0) == 0.0
        assert stopped_using_dead_s([{"t": 1.0, "queue": 0.0}], 60.0) == 0.0  # no such field

    def test_replica_restored(self):
        assert replica_restored_s(fake_timeline(decode_replicas={0: 2.0, 63: 1.0, 90: 2.0}), 60.0, 2) == 30.0
        assert replica_restored_s(fake_timeline(decode_replicas={0: 2.0}), 60.0, 2) is None  # never dropped
        assert replica_restored_s(fake_timeline(decode_replicas={0: 2.0, 63: 1.0}), 60.0, 2) is None  # never back
        # a dip before the kill (replicas still starting) is not the one measured
        assert replica_restored_s(fake_timeline(decode_replicas={0: 1.0, 10: 2.0, 70: 1.0, 75: 2.0}), 60.0, 2) == 15.0

    def test_throughput_recovered(self):
        # finishing one per second before the kill (41 in [20, 60) s: 90 % of that rate is 10 per 10 s
        # window), none for 25 s after it, then one per second again: the window [85, 95) is the first
        pre = [fake_ok(t - 10.0) for t in range(10, 60)] + [fake_ok(20.5)]
        recs = pre + [fake_ok(t - 10.0) for t in range(85, 200)]
        assert throughput_recovered_s(recs, 60.0, MAX) == 25.0
        assert throughput_recovered_s(pre, 60.0, MAX) is None  # never again
        assert throughput_recovered_s([fake_ok(t - 10.0, tokens=5) for t in range(10, 200)], 60.0, MAX) is None
        assert throughput_recovered_s(recs, 15.0, MAX) is None  # kill inside the warm-up

    def test_throughput_needs_90_percent(self):
        pre = [fake_ok(t - 10.0) for t in range(10, 60)]
        same = [fake_ok(t - 10.0) for t in range(60, 200)]
        slower = [fake_ok(t - 10.0) for t in range(60, 200) if t % 5 != 0]  # 80 %
        assert throughput_recovered_s(pre + same, 60.0, MAX) == 0.0
        assert throughput_recovered_s(pre + slower, 60.0, MAX) is None


def fake_run() -> tuple[list[RequestRecord], list[dict]]:
    """60 s of normal service, a kill with two in-flight requests failing and one late rejection, a
    pause with a slow answer and a hung request, a truncated answer after it."""
    recs = [fake_ok(float(t)) for t in range(0, 60)]
    recs += [fake_error(60.5, e2e_s=2.0), fake_error(61.0), fake_rejected(64.0)]
    recs += [fake_ok(float(t)) for t in range(65, 120)]
    recs += [fake_ok(121.0, e2e_s=15.0), fake_hung(125.0), fake_ok(135.0, tokens=40)]
    tl = fake_timeline(decode_replicas={0: 2.0, 62: 1.0, 100: 2.0}, decode_retries={0: 0.0, 61: 1.0, 64: 2.0})
    return recs, tl


class TestAnalysis:
    def test_analyse_a_fake_run(self):
        recs, tl = fake_run()
        a = analyse(recs, tl, FAKE_FAULTS, MAX)
        assert a["counts"] == {
            "sent": 121,
            "completed": 116,
            "failed": 3,
            "rejected_503_429": 1,
            "error": 2,
            "hung": 1,
            "truncated": 1,
        }
        assert a["by_phase"]["before_kill"]["completed"] == 60
        assert a["by_phase"]["kill_to_pause"] == {
            "sent": 58,
            "completed": 55,
            "failed": 3,
            "rejected_503_429": 1,
            "error": 2,
            "hung": 0,
            "truncated": 0,
        }
        assert a["by_phase"]["pause"]["hung"] == 1 and a["by_phase"]["after_pause"]["truncated"] == 1
        assert a["new_request_503s_after_kill"] == 1
        assert a["stopped_using_dead_s"] == 4.0
        assert a["last_error_after_kill_s"] == 4.0  # the rejection at 64 s (no e2e: its arrival)
        assert a["replica_restored_s"] == 40.0
        assert a["throughput_recovered_s"] == 0.0
        assert [g["pass"] for g in a["goals"]] == [False, False, False]

    def test_report_and_plot(self, tmp_path):
        recs, tl = fake_run()
        plot = plot_timeline(tmp_path, recs, tl, FAKE_FAULTS, MAX)
        assert plot.stat().st_size > 5000
        summary = {
            "meta": {
                "run_id": "fake",
                "skipped": 0,
                "args": {"config": "configs/bench/two-decode.yaml", "rate": 1.0, "duration": 180.0, "drain": 120.0},
            },
            "faults": FAKE_FAULTS,
            "plot": plot.name,
            "analysis": analyse(recs, tl, FAKE_FAULTS, MAX),
        }
        write_report(tmp_path, summary)
        md = (tmp_path / "report.md").read_text()
        assert "| all | 121 | 116 | 3 (1) | 1 | 1 |" in md
        assert "| kill to pause (60-120 s) | 58 | 55 | 3 (1) | 0 | 0 |" in md
        assert "| 0 new-request 503s after losing one of two decode replicas | 1 | FAIL |" in md
        assert "| decode replicas back to 2 | 40.0 s |" in md and "`timeline.png`" in md


class TestRunSetup:
    def test_two_decode_config_is_the_default_with_two_decode_replicas(self):
        from serve.config import DEFAULT_CONFIG, load_config_data

        default = load_config_data(DEFAULT_CONFIG)
        two = load_config_data(REPO / "configs" / "bench" / "two-decode.yaml")
        decode = next(p for p in default["pools"] if p["role"] == "decode")
        decode["replicas"] = {"min": 2, "max": 2}
        decode["device"]["cpu_cores"] = ["1", "0"]
        assert two == default
        assert fault_targets(str(REPO / "configs" / "bench" / "two-decode.yaml")) == {
            "app_name": "pdserve",
            "prefill": "prefill",
            "decode": "decode",
        }

    def test_two_decode_config_validates(self):
        from serve.config import ClusterConfig

        cfg = ClusterConfig.from_yaml(REPO / "configs" / "bench" / "two-decode.yaml")
        assert [(p.role.value, p.replicas.min, p.replicas.max) for p in cfg.pools] == [
            ("prefill", 1, 1),
            ("decode", 2, 2),
        ]

    def test_cli(self):
        a = parse_args([])
        assert (a.rate, a.duration, a.kill_decode_at, a.pause_prefill_at, a.pause_s, a.drain) == (
            1.0,
            180.0,
            60.0,
            120.0,
            10.0,
            120.0,
        )
        assert Path(a.config) == REPO / "configs" / "bench" / "two-decode.yaml"
        with pytest.raises(SystemExit):
            parse_args(["--kill-decode-at", "130"])  # the kill must come before the pause


def test_engine_processes_of_one_replica():
    """Stand-ins: a shell "replica" with a ``VLLM::EngineCore`` child and a plain child."""
    replica = subprocess.Popen(["bash", "-c", "(exec -a VLLM::EngineCore sleep 30) & sleep 30 & wait"])
    try:
        proc = psutil.Process(replica.pid)
        deadline = time.monotonic() + 5
        while len(proc.children()) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        engines = faults.engine_processes_of(proc)
        assert [e.cmdline()[0] for e in engines] == ["VLLM::EngineCore"]
        faults.kill(engines)
        assert faults.engine_processes_of(proc) == []
    finally:
        for child in psutil.Process(replica.pid).children(recursive=True):
            child.kill()
        replica.kill()
        replica.wait()
    assert faults.engine_processes_of(proc) == []  # the replica is gone
