"""The README's Python tour runs as it is written (in a fresh interpreter, in an empty folder)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def _tour() -> str:
    text = README.read_text()
    section = text[text.index("### From Python"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_tour_runs(tmp_path):
    code = "import torch; torch.set_num_threads(1)\n" + _tour()
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "base vs post" in r.stdout and any(v in r.stdout for v in ("agrees", "disagrees", "inconclusive"))
    assert (tmp_path / "tour.zarr").is_dir() and (tmp_path / "tour-results" / "truthfulness" / "summary.json").is_file()
