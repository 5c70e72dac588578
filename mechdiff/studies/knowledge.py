"""Knowledge storage: activation patching of true/false fact pairs over layers x positions, within and across
models. Datasets: ``pairs`` (paired statements), ``shots`` (optional few-shot examples).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mechdiff.analyses.common import ModelGroup, StudyResult
from mechdiff.analyses.knowledge import KnowledgeConfig as Config
from mechdiff.analyses.knowledge import study
from mechdiff.analyses.study import run_on

__all__ = ["Config", "run", "study"]


def run(group: ModelGroup, out: str | Path, config: Config | None = None, **kwargs: Any) -> StudyResult:
    """The study on ``group``, into ``out``; ``kwargs``: its datasets by role, and the options of
    :func:`mechdiff.analyses.study.run_on` (device, model_dtype, models, stores, store, progress)."""
    return run_on(study, group, out, config, **kwargs)
