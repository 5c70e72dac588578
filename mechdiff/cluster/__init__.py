"""Ray: actor pool, scheduling, retries, sweeps and dask-on-Ray.

Importing this package does not import Ray; the names below load their module on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ActorPool": "pool",
    "ModelWorker": "pool",
    "PoolError": "pool",
    "Task": "pool",
    "load_sweep": "sweep",
    "parse_sweep": "sweep",
    "plan_sweep": "sweep",
    "sweep_status": "sweep",
    "Sweep": "sweep",
    "SweepError": "sweep",
    "ModelSpec": "sweep",
    "run_sweep": "runner",
    "SweepReport": "runner",
    "SweepFailed": "runner",
    "dask_scheduler": "dask_ray",
    "connect": "ray_env",
    "LocalCluster": "ray_env",
    "SweepProgress": "progress",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"mechdiff.cluster.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'mechdiff.cluster' has no attribute {name!r}")
