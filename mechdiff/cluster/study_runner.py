"""A model group's studies on the Ray cluster, not in the driver.

One Ray task per model group, reserving what one extraction actor reserves (a GPU each when the
cluster has GPUs), runs :func:`mechdiff.pipeline.run_job` there, on the stores the sweep's pool wrote: the models load on that worker and
the interventions, patching and generation run on its device, while the studies' dask reductions over
the store go to the cluster's workers (dask-on-Ray). The output directory must be reachable from the
workers (a shared filesystem), as a local-path store must be.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:  # pragma: no cover
    from mechdiff.cluster.sweep import Resources
    from mechdiff.pipeline import GroupJob, RunOptions, RunOutcome

__all__ = ["GroupRun", "run_groups_on_cluster"]


@dataclass
class GroupRun:
    """A group's outcome and where its studies ran."""

    outcome: "RunOutcome"
    host: str
    pid: int


def _run_here(job: "GroupJob", opts: "RunOptions", threads: int, address: str) -> GroupRun:
    import torch

    from mechdiff.cluster.dask_ray import dask_scheduler
    from mechdiff.pipeline import run_job

    torch.set_num_threads(threads)
    # the task's own progress bars would interleave in the driver's log: studies report when done
    with dask_scheduler(address):
        outcome = run_job(job, replace(opts, progress=False))
    return GroupRun(outcome, socket.gethostname(), os.getpid())


def run_groups_on_cluster(jobs: Sequence["GroupJob"], opts: "RunOptions", address: str,
                          resources: "Resources") -> list[GroupRun]:
    """Run every job's studies as a task on the cluster at ``address``, all submitted at once (groups run in
    parallel where the cluster has room), and wait for them; a failed group raises its error."""
    import ray

    from mechdiff.cluster.ray_env import ray_session

    with ray_session(address):
        gpus = resources.num_gpus
        if gpus is None:
            gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
        task = ray.remote(_run_here).options(num_cpus=resources.num_cpus, num_gpus=gpus, max_retries=0)
        refs = [task.remote(replace(j, out=Path(j.out).resolve()), opts, resources.threads(), address) for j in jobs]
        return ray.get(refs)
