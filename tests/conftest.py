"""Shared fixtures: tiny random models built from configs (no hub), one per architecture."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Build (once per session) and return the directory of a tiny model of the given architecture."""
    from mechdiff.engine.tiny import build_tiny_model

    cache: dict[tuple, object] = {}

    def make(arch: str = "llama", **kw):
        key = (arch, tuple(sorted(kw.items())))
        if key not in cache:
            path = tmp_path_factory.mktemp(f"tiny_{arch}")
            cache[key] = build_tiny_model(path, arch=arch, **kw)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_llama(tiny_dir):
    from mechdiff.engine.models import load_model

    return load_model(tiny_dir("llama", n_layers=3))
