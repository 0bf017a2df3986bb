import json
import textwrap
from pathlib import Path

import pytest
import yaml

from kvtransfer.config import SlabSettings
from serve.config import DEFAULT_CONFIG, ClusterConfig, ConfigError, apply_overrides, load_config_data, merge_overlay
from tests.conftest import REPO
from workers.config import CpuDevice, GpuDevice, PoolConfig, PoolRole

BASE = {
    "model": {"name": "m"},
    "pools": [
        {"name": "prefill", "role": "prefill", "device": {"kind": "cpu", "cpu_cores": "0"}},
        {"name": "decode", "role": "decode", "device": {"kind": "cpu", "cpu_cores": "1"}},
    ],
}


def with_pool(i: int, **changes) -> dict:
    d = {**BASE, "pools": [dict(p) for p in BASE["pools"]]}
    d["pools"][i].update(changes)
    return d


def error_of(data: dict) -> str:
    with pytest.raises(Exception) as ei:
        ClusterConfig.from_dict(data)
    return str(ei.value)


class TestDefaultConfig:
    def test_embedded_default_loads(self):
        cfg = ClusterConfig.from_yaml(DEFAULT_CONFIG)
        assert [p.role for p in cfg.pools] == [PoolRole.PREFILL, PoolRole.DECODE]
        cores = [p.device.cpu_cores for p in cfg.pools]
        assert cores[0] != cores[1], "the default pins prefill and decode to separate cores"
        assert cfg.model.path == "bundled:smollm2"

    def test_decode_only_cluster_and_bench_configs_load(self):
        # no prefill pool: every request prefills on its decode replica (colocated replicas)
        cfg = ClusterConfig.from_dict({**BASE, "pools": [BASE["pools"][1]]})
        assert [p.role.value for p in cfg.pools] == ["decode"]
        bench = sorted((REPO / "configs" / "bench").glob("*.yaml"))
        assert bench, "no configs/bench/*.yaml found"
        for f in bench:
            ClusterConfig.from_yaml(f)

    def test_int_replicas_is_fixed_range(self):
        cfg = ClusterConfig.from_dict(with_pool(1, replicas=2))
        r = cfg.pools[1].replicas
        assert (r.min, r.max, r.fixed) == (2, 2, True)


class TestInvalidConfig:
    @pytest.mark.parametrize(
        "data, field",
        [
            (with_pool(0, role="prefil"), "pools.0.role"),
            (with_pool(1, replicas={"min": 3, "max": 1}), "pools.1.replicas"),
            (with_pool(0, engine={"block_size": 16}), "block_size"),
            (with_pool(0, engine={"bogus": 1}), "pools.0.engine.bogus"),
            (with_pool(0, device={"kind": "cpu", "cpu_cores": "zero"}), "pools.0.device.cpu.cpu_cores"),
            (with_pool(0, device={"kind": "gpu", "count": 2}), "device.count"),
            (with_pool(0, engine={"extra": {"model": "x"}}), "managed keys"),
            ({**BASE, "pools": [BASE["pools"][1], BASE["pools"][1]]}, "duplicate pool names"),
            ({**BASE, "pools": [BASE["pools"][0], {**BASE["pools"][0], "name": "p2"}]}, "role ['decode']"),
            ({**BASE, "surprise": 1}, "surprise"),
            ({**BASE, "router": {"default_tier": "gold"}}, "default_tier"),
        ],
    )
    def test_error_names_the_field(self, data, field):
        assert field in error_of(data)

    def test_yaml_errors_name_file_and_field(self, tmp_path):
        p = tmp_path / "bad.yaml"
        p.write_text(
            textwrap.dedent("""
            model: {name: m}
            pools:
              - {name: prefill, role: prefill}
              - {name: decode, role: decode, replicas: -1}
        """)
        )
        with pytest.raises(ConfigError) as ei:
            ClusterConfig.from_yaml(p)
        msg = str(ei.value)
        assert "bad.yaml" in msg and "pools.1.replicas" in msg

    def test_missing_file(self, tmp_path):
        with pytest.raises(ConfigError, match="not found"):
            ClusterConfig.from_yaml(tmp_path / "nope.yaml")


class TestDevices:
    def test_cores_per_rank_wrap(self):
        d = CpuDevice(cpu_cores=["0", "1"])
        assert [d.cores_for_rank(i) for i in range(3)] == ["0", "1", "0"]

    def test_gpu_pool_matches_parallelism(self):
        p = PoolConfig(
            name="p",
            role="prefill",
            device={"kind": "gpu", "gpu_type": "A100", "count": 2},
            engine={"tensor_parallel_size": 2, "block_size": 16},
        )
        assert isinstance(p.device, GpuDevice) and p.device.count == 2


class TestRouterTimeouts:
    def test_defaults_and_descriptions(self):
        r = ClusterConfig.from_dict(BASE).router
        assert (r.prefill_timeout_s, r.idle_timeout_s) == (60.0, 600.0)
        fields = type(r).model_fields
        assert fields["prefill_timeout_s"].description and fields["idle_timeout_s"].description

    def test_set_and_validated(self):
        r = ClusterConfig.from_dict({**BASE, "router": {"prefill_timeout_s": 5, "idle_timeout_s": 30}}).router
        assert (r.prefill_timeout_s, r.idle_timeout_s) == (5.0, 30.0)
        assert "router.prefill_timeout_s" in error_of({**BASE, "router": {"prefill_timeout_s": 0}})


BENCH_EXPECTED = json.loads((Path(__file__).parent / "data" / "bench_configs.json").read_text())


class TestOverlays:
    @pytest.mark.parametrize("name", sorted(BENCH_EXPECTED))
    def test_bench_overlay_resolves_to_its_recorded_full_config(self, name):
        """tests/unit/data/bench_configs.json holds what each configs/bench file gave as a complete file."""
        path = REPO / "configs" / "bench" / f"{name}.yaml"
        assert yaml.safe_load(path.read_text())["base"] == "default"
        cfg = ClusterConfig.from_yaml(path)
        assert cfg.model_dump(mode="json") == BENCH_EXPECTED[name]
        assert ClusterConfig.from_dict(cfg.model_dump(mode="json")) == cfg  # the dump serves the same config

    def test_every_bench_config_is_recorded(self):
        assert sorted(p.stem for p in (REPO / "configs" / "bench").glob("*.yaml")) == sorted(BENCH_EXPECTED)

    def test_merge_rules(self):
        base = {
            "a": {"x": 1, "y": [1, 2]},
            "s": "v",
            "n": 3,
            "pools": [{"name": "p", "role": "prefill", "engine": {"k": 1}}, {"name": "d", "role": "decode"}],
        }
        snapshot = json.dumps(base)
        merged = merge_overlay(
            base,
            {
                "a": {"y": [3]},
                "n": None,
                "new": {"z": 1},
                "pools": {"p": {"engine": {"j": 2}}, "e": {"role": "decode"}},
            },
        )
        assert merged == {
            "a": {"x": 1, "y": [3]},
            "s": "v",
            "n": None,
            "new": {"z": 1},
            "pools": [
                {"name": "p", "role": "prefill", "engine": {"k": 1, "j": 2}},
                {"name": "d", "role": "decode"},
                {"name": "e", "role": "decode"},
            ],
        }
        assert json.dumps(base) == snapshot, "the base is not modified"
        assert merge_overlay(base, {"pools": {"p": None}})["pools"] == [{"name": "d", "role": "decode"}]
        assert merge_overlay(base, {"pools": [{"name": "q"}]})["pools"] == [{"name": "q"}]  # a list replaces

    def test_base_chain_relative_path_and_errors(self, tmp_path):
        (tmp_path / "two.yaml").write_text("base: default\npools: {decode: {replicas: 2}}\n")
        (tmp_path / "sub").mkdir()
        (tmp_path / "sub" / "three.yaml").write_text("base: ../two.yaml\nserver: {port: 9000}\n")
        cfg = ClusterConfig.from_yaml(tmp_path / "sub" / "three.yaml")
        default = ClusterConfig.from_yaml(DEFAULT_CONFIG)
        assert (cfg.server.port, cfg.pools[1].replicas.max, cfg.pools[0]) == (9000, 2, default.pools[0])
        (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
        with pytest.raises(ConfigError, match="loops"):
            ClusterConfig.from_yaml(tmp_path / "loop.yaml")
        (tmp_path / "gone.yaml").write_text("base: default\npools: {nosuch: null}\n")
        with pytest.raises(ConfigError, match=r"gone.yaml: pools.nosuch: no entry of that name"):
            ClusterConfig.from_yaml(tmp_path / "gone.yaml")
        (tmp_path / "missing.yaml").write_text("base: nowhere.yaml\n")
        with pytest.raises(ConfigError, match="not found"):
            ClusterConfig.from_yaml(tmp_path / "missing.yaml")
        (tmp_path / "bad.yaml").write_text("base: default\npools: {decode: {replicas: -1}}\n")
        with pytest.raises(ConfigError, match=r"(?s)bad.yaml.*pools.1.replicas"):
            ClusterConfig.from_yaml(tmp_path / "bad.yaml")


class TestOverrides:
    def test_set_edits_dotted_keys(self):
        data = {"pools": [{"engine": {"extra": {"num_gpu_blocks_override": 32}}}], "router": {}}
        apply_overrides(
            data,
            [
                "pools.0.engine.extra.num_gpu_blocks_override=24",
                "router.admission.enabled=false",
                "pools.0.device=[0, 1]",
            ],
        )
        assert data == {
            "pools": [{"engine": {"extra": {"num_gpu_blocks_override": 24}}, "device": [0, 1]}],
            "router": {"admission": {"enabled": False}},
        }
        for bad in ("no-equals-sign", "pools.5.replicas=1", "pools.x.replicas=1", "router.admission.enabled.x=1"):
            with pytest.raises(ConfigError):
                apply_overrides({"pools": [{}], "router": {"admission": {"enabled": True}}}, [bad])

    def test_set_applies_after_the_overlay(self):
        path = REPO / "configs" / "bench" / "two-decode.yaml"
        cfg = ClusterConfig.from_yaml(path, ["pools.1.replicas=3", "server.port=9001"])
        assert (cfg.pools[1].replicas.max, cfg.server.port) == (3, 9001)
        assert load_config_data(path)["pools"][1]["replicas"] == {"min": 2, "max": 2}

    def test_cli_validate_takes_set(self, capsys):
        from serve.cli import main

        assert main(["validate", "--set", "server.port=9002"]) == 0
        assert json.loads(capsys.readouterr().out)["server"]["port"] == 9002
        assert main(["validate", "--set", "pools.7.name=x"]) == 2
        assert "does not name a place" in capsys.readouterr().err


class TestKvHandoff:
    def test_slab_section_is_the_connectors_settings(self):
        kvh = ClusterConfig.from_dict(
            {
                **BASE,
                "kv_handoff": {
                    "backend": "slab",
                    "slab": {"compression": "int8", "read_timeout_s": 4, "pool_mib": 512, "idle_wait_ms": 0},
                },
            }
        ).kv_handoff
        assert kvh.slab == SlabSettings(compression="int8", read_timeout_s=4, pool_mib=512, idle_wait_ms=0)
        assert ClusterConfig.from_dict(BASE).kv_handoff.slab == SlabSettings()

    @pytest.mark.parametrize(
        "slab, field",
        [
            ({"compression": "int2"}, "kv_handoff.slab.compression"),
            ({"group": 3}, "group must be even"),
            ({"ucx_tls": "tcp"}, "kv_handoff.slab.ucx_tls"),  # owned by kv_handoff itself
            ({"handoff_timeout_s": 5}, "kv_handoff.slab.handoff_timeout_s"),  # = kv_handoff.kv_lease_s
        ],
    )
    def test_slab_section_errors_name_the_field(self, slab, field):
        assert field in error_of({**BASE, "kv_handoff": {"backend": "slab", "slab": slab}})

    @pytest.mark.parametrize("key", ["slab_compression", "slab_tokens"])
    def test_slab_options_live_under_slab(self, key):
        assert f"kv_handoff.{key}" in error_of({**BASE, "kv_handoff": {key: 1}})
