"""The host allocator setting of CPU extraction: freed activation memory is reused, not faulted in again."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mechdiff.engine import host_memory

# A forward pass in miniature: large activations made and freed over and over (48 MiB: above the size from
# which glibc always maps fresh pages). Prints the minor page faults of 40 rounds before and after the
# setting, and what the setting said.
CHILD = r"""
import resource, sys
import numpy as np
from mechdiff.engine.host_memory import retain_freed_memory

def faults():
    np.ones(6 << 20)  # warm
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(40):
        a = np.ones(6 << 20)  # 48 MiB, written, freed
        del a
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0

before = faults()
state = retain_freed_memory()
print(before, faults(), state, retain_freed_memory())
"""


def _child(env_value: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host_memory.ENV)}
    if env_value is not None:
        env[host_memory.ENV] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout.split()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
def test_freed_memory_is_reused_instead_of_faulted_in_again():
    before, after, state, again = _child(None)
    if state.startswith("unavailable"):
        pytest.skip(f"the allocator cannot be set here: {state}")
    assert state == again == "retained"
    # each fresh 48 MiB block faults its pages in (hundreds to thousands, by page size); reused ones none
    assert int(before) > 4_000 and int(after) < int(before) / 20, (before, after)


def test_opting_out_leaves_the_allocator_alone():
    before, after, state, _ = _child("system")
    assert state == "system"
    assert int(after) > int(before) / 2  # still one fault per fresh page


def test_a_bad_setting_is_named(monkeypatch):
    monkeypatch.setattr(host_memory, "_state", None)
    monkeypatch.setenv(host_memory.ENV, "fast")
    with pytest.raises(ValueError, match="MECHDIFF_MALLOC='fast': retain .* or system"):
        host_memory.retain_freed_memory()
