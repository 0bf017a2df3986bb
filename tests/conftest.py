"""Shared fixtures. Ray, vLLM and NIXL are hard requirements of the suite: a missing one fails
loudly (ImportError at collection), never a silent skip."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def model_dir() -> Path:
    from serve.model_prep import prepare_bundled

    return prepare_bundled()


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir))
