"""Import rules of the design: policy stays pure, packages depend one way."""

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HEAVY = {"ray", "vllm", "torch", "nixl", "fastapi"}
RULES = {
    # package: (forbidden internal packages, forbidden third-party roots)
    "router": ({"serve", "workers", "kvtransfer"}, HEAVY),
    "workers": ({"serve", "router"}, set()),
    "kvtransfer": ({"serve", "workers", "router"}, set()),
    # capacity planning runs the real router objects and reads kvtransfer's codecs, nothing that serves
    "capacity": ({"serve"}, HEAVY),
}


def imports(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(RULES))
def test_package_imports(package):
    internal, third_party = RULES[package]
    for f in sorted((REPO / package).rglob("*.py")):
        bad = imports(f) & (internal | third_party)
        assert not bad, f"{f.relative_to(REPO)} imports {sorted(bad)}"


def test_nobody_imports_serve():
    for package in ("router", "workers", "kvtransfer", "capacity", "loadtests"):
        for f in sorted((REPO / package).rglob("*.py")):
            assert "serve" not in imports(f), f"{f.relative_to(REPO)} imports serve (the composition root)"


def test_product_packages_never_import_the_studies():
    """Benchmarks and studies live in loadtests/; what pdserve runs never depends on them."""
    for package in ("router", "workers", "kvtransfer", "capacity", "serve"):
        for f in sorted((REPO / package).rglob("*.py")):
            assert "loadtests" not in imports(f), f"{f.relative_to(REPO)} imports loadtests"


# modules both sides of the KV handoff seam import (serve/workers and the connector inside vLLM's processes)
SEAM_MODULES = (
    "kvtransfer/wire.py",
    "kvtransfer/config.py",
    "workers/engine_env.py",
    "workers/kv_params.py",
    "workers/config.py",
)


@pytest.mark.parametrize("module", SEAM_MODULES)
def test_seam_modules_import_no_engine(module):
    bad = imports(REPO / module) & HEAVY
    assert not bad, f"{module} imports {sorted(bad)}"
