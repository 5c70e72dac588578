"""Where the shipped pair lives inside the installed package."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

Kind = Literal["base", "post", "data"]
PAIR_DIR = Path(__file__).resolve().parent / "pair"
KINDS: tuple[str, ...] = ("base", "post", "data")


def zoo_path(kind: Kind) -> Path:
    """Directory of the shipped base model, post-trained model, or datasets."""
    if kind not in KINDS:
        raise ValueError(f"unknown zoo kind {kind!r}; expected one of {', '.join(KINDS)}")
    path = PAIR_DIR / kind
    if not path.is_dir():
        raise FileNotFoundError(
            f"{path} is missing: the package was installed without the zoo pair. "
            "Rebuild it with `mechdiff zoo build --out DIR`.")
    return path


def manifest_path() -> Path:
    return PAIR_DIR / "manifest.json"
