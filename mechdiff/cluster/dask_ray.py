"""Where the studies' dask graphs run: on a Ray cluster (dask-on-Ray) or on local threads.

    with dask_scheduler(address):          # address None: local threads
        result = study(open_store(url, group))   # every .compute() inside runs there

dask-on-Ray is Ray's own scheduler, ``ray.util.dask.ray_dask_get``: each dask task becomes a Ray task,
so reductions over a store on shared storage (s3://, gs://, a shared filesystem) spread over the
cluster's workers. ``ray.util.dask`` imports ``dask.dataframe``, which needs ``pyarrow``.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

__all__ = ["dask_scheduler", "DaskOnRayUnavailable"]


class DaskOnRayUnavailable(ImportError):
    """Ray's dask scheduler cannot be imported here."""


def _ray_dask_get():
    try:
        from ray.util.dask import ray_dask_get
    except ImportError as e:
        raise DaskOnRayUnavailable(
            f"dask-on-Ray is unavailable: importing ray.util.dask failed ({e}). It imports dask.dataframe, "
            "which needs pyarrow: pip install pyarrow"
        ) from e
    return ray_dask_get


@contextlib.contextmanager
def dask_scheduler(address: str | None = None, *, num_workers: int | None = None) -> Iterator[str]:
    """Make every dask ``compute()`` in the block run on the Ray cluster at ``address``, or on a local
    thread pool (``num_workers`` threads) when ``address`` is None. Yields ``"ray"`` or ``"threads"``.

    Joins the cluster if this process is not connected yet (and leaves it afterwards); an existing
    connection is reused as is.
    """
    import dask

    if address is None:
        with dask.config.set(scheduler="threads", num_workers=num_workers):
            yield "threads"
        return
    get = _ray_dask_get()  # fail before connecting
    from mechdiff.cluster.ray_env import ray_session

    with ray_session(address):
        with dask.config.set(scheduler=get, num_workers=num_workers):
            yield "ray"
