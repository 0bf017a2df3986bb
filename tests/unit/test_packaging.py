"""What a non-editable ``pip install .`` ships: the five product packages and the embedded default config
as package data; no tests, no load generation or studies (pyproject.toml [tool.setuptools])."""

import fnmatch
import tomllib

from setuptools import find_namespace_packages

from serve.cli import main
from serve.config import DEFAULT_CONFIG, ClusterConfig
from tests.conftest import REPO

PRODUCT = ("serve", "workers", "router", "kvtransfer", "capacity")


def setuptools_table() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_only_the_product_packages_are_packaged():
    find = setuptools_table()["packages"]["find"]
    assert find["include"] == [f"{p}*" for p in PRODUCT]
    # what setuptools' automatic discovery (namespace packages included) picks from the repo with that rule
    found = find_namespace_packages(where=str(REPO), include=find["include"], exclude=find.get("exclude", ()))
    assert {p.split(".")[0] for p in found} == set(PRODUCT)
    assert not [p for p in found if p.split(".")[0] in {"tests", "loadtests", "configs"}]


def test_the_default_config_is_package_data():
    data = setuptools_table()["package-data"]
    assert DEFAULT_CONFIG.parent == REPO / "serve" and DEFAULT_CONFIG.is_file()
    assert any(fnmatch.fnmatch(DEFAULT_CONFIG.name, pattern) for pattern in data["serve"])


def test_serve_without_a_config_uses_the_embedded_default(monkeypatch):
    import serve.runner

    seen = {}

    def fake_start(cfg, **_):
        seen["cfg"] = cfg
        raise RuntimeError("stop here")

    monkeypatch.setattr(serve.runner, "start_cluster", fake_start)
    monkeypatch.setattr("signal.signal", lambda *_: None)  # cmd_serve's SIGTERM handler stays out of pytest
    assert main(["serve"]) == 1
    assert seen["cfg"] == ClusterConfig.from_yaml(DEFAULT_CONFIG)


def test_the_shipped_profiles_are_package_data():
    from capacity.profile import load_profiles

    data = setuptools_table()["package-data"]
    assert data["capacity"] == ["profiles/*.json", "*.yaml"]
    shipped = sorted((REPO / "capacity" / "profiles").glob("*.json"))
    assert [p.name for p in shipped] and "smollm2-135m-cpu.json" in [p.name for p in shipped]
    for path in shipped:
        assert fnmatch.fnmatch(str(path.relative_to(REPO / "capacity")), data["capacity"][0])
        assert load_profiles(path)
