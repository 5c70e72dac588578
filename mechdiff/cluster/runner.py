"""Running a sweep: plan, create each store group in the driver, and let the actor pool fill the shards.

The order of things, each step only after the previous one succeeded:

1. parse and plan (datasets loaded, layer ranges checked, existing groups read, read-only): bad input
   stops here;
2. connect to Ray (an address where no cluster answers fails within seconds, naming it), all before any
   store or output folder is created;
3. per target with shards missing, one actor holding its model tokenizes the dataset (``prepare``)
   and sends back coords, token ids and provenance; the driver creates (or re-opens and checks) the
   store group with them;
4. the missing shards become work units, one store shard each, so no two actors ever write one
   chunk; actors open the group and write their shard into it, and the store sets a shard's done
   flag only after its data is written. A re-run skips done shards (and whole done groups without
   loading their model).
"""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from mechdiff.errors import MechdiffError
from mechdiff.engine.extract import identity_keys
from mechdiff.cluster.sweep import StatusRow, Sweep, SweepPlan, Target, TargetPlan, load_sweep, plan_sweep

__all__ = ["run_sweep", "SweepReport", "SweepFailed"]


@dataclass
class SweepReport:
    sweep: str
    rows: list[StatusRow]
    units_run: int
    units_skipped: int
    tokens: int
    seconds: float
    retries: int
    actor_deaths: int
    failures: dict[str, str] = field(default_factory=dict)
    studies: list[str] = field(default_factory=list)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


class SweepFailed(MechdiffError, RuntimeError):
    """Some units failed after their retries; ``.report`` has the rest, ``.report.failures`` the reasons."""

    def __init__(self, report: SweepReport):
        self.report = report
        lines = "\n  ".join(f"{k}: {v}" for k, v in report.failures.items())
        super().__init__(f"sweep {report.sweep}: {len(report.failures)} unit(s) failed:\n  {lines}")


def _check_room(url: str, nbytes: int) -> None:
    if "://" in url and not url.startswith("file://"):
        return  # object stores report no free space
    probe = Path(url.removeprefix("file://"))
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if nbytes > free:
        raise OSError(f"{url} needs up to {nbytes / 1e9:.2f} GB (uncompressed) but {probe} has {free / 1e9:.2f} GB free")


def run_sweep(
    sweep: Sweep | str | Path,
    *,
    address: str | None = None,
    pool: Any = None,
    progress: bool = True,
    console: Any = None,
    on_event: Callable[[Any], None] | None = None,
    actors: int | None = None,
    extra: Sequence[tuple[Any, Any]] | None = None,
) -> SweepReport:
    """Extract every capture of every model on every dataset of the sweep, on Ray.

    ``address``: the Ray cluster (``host:port``, ``ray://host:10001``, ``auto``); None starts a Ray on
    this machine (reused if this process is already connected). ``pool``: an existing
    :class:`~mechdiff.cluster.pool.ActorPool` to run on (kept open). ``extra``: the (target, prompts) of the
    studies' own captures (default: those of every study the sweep configures, with its options; see
    :func:`mechdiff.cluster.study_plan.study_targets`). Raises :class:`SweepError`
    before anything starts on a bad sweep, and :class:`SweepFailed` after the run if units failed.
    """
    if not isinstance(sweep, Sweep):
        sweep = load_sweep(sweep)
    if extra is None:
        from mechdiff.cluster.study_plan import study_extraction

        extra = study_extraction(sweep)
    plan = plan_sweep(sweep, extra)  # reads the stores, creates nothing
    todo = [p for p in plan.targets if p.missing > 0]
    if not todo:
        if address is not None and pool is None:
            # nothing to run, but an --address where no cluster answers is still an error, not a success
            from mechdiff.cluster.ray_env import check_reachable

            if not _connected():
                check_reachable(address)
        return _report(sweep, plan, 0, 0.0, 0, 0, {})

    import ray

    from mechdiff.cluster.pool import ActorPool, Task, UnitResult, replicas_that_fit
    from mechdiff.cluster.progress import SweepProgress, TargetStats
    from mechdiff.cluster.ray_env import ray_session
    from mechdiff.engine.store import ActivationStore

    res = sweep.resources
    # Ray first (an unreachable address fails here, in seconds, naming it): no store or folder is created
    # before the cluster answered
    with ray_session(address):
        own_pool = pool is None
        if own_pool:
            num_gpus = res.num_gpus
            if num_gpus is None:  # auto: a GPU per replica where the cluster has GPUs
                num_gpus = 1.0 if ray.cluster_resources().get("GPU", 0) > 0 else 0.0
            wanted = actors or res.actors
            # An explicit count is taken as it is, even beyond what is up now: an autoscaler adds nodes
            # for replicas waiting for resources. Otherwise as many as the cluster holds.
            n = wanted if wanted else replicas_that_fit(res.num_cpus, num_gpus)
            # never more replicas than there are units to share out
            n = min(n, sum(p.missing for p in todo))
            pool = ActorPool(n, num_cpus=res.num_cpus, num_gpus=num_gpus, torch_threads=res.threads(),
                             max_retries=res.max_retries)
        # every dataset goes to the object store once; actors fetch it by reference
        refs = {name: ray.put(p.prompts) for name, p in {p.target.dataset.name: p for p in todo}.items()}
        by_key: dict[str, TargetPlan] = {p.target.key: p for p in todo}
        stats = [
            TargetStats(p.target.key, p.target.model.key, p.target.dataset.name, p.target.capture.name, p.n_shards, len(p.done))
            for p in plan.targets
        ]
        display = SweepProgress(f"sweep {sweep.name}", stats, console=console, enabled=progress, pool=pool)

        def common(t: Target) -> tuple:
            # the actor caches its tokenized dataset under this key: hashing the dataset and the capture
            # keeps a long-lived pool from reusing a stale one
            ident = f"{by_key[t.key].prompts.hash}|{t.capture.spec!r}|{sweep.max_length}|{sweep.truncate}"
            prep_key = f"{t.key}@{hashlib.sha256(ident.encode()).hexdigest()[:16]}"
            return (prep_key, [refs[t.dataset.name]], t.capture, sweep.max_length, sweep.truncate)

        def on_done(task: Task, value: Any) -> list[Task]:
            if task.kind != "prepare":
                return []
            p = by_key[task.info]
            t = p.target
            # room for what is left to write, not for the whole store
            n, size = value["n_examples"], sweep.shard_size
            left = n - sum(min(size, n - i * size) for i in p.done)
            _check_room(t.url, ActivationStore.estimate_nbytes_for(left, value["arrays"]))
            store = ActivationStore.create_or_open(
                t.url, t.group, n_examples=value["n_examples"], shard_size=sweep.shard_size,
                arrays=value["arrays"], coords=value["coords"], token_ids=value["token_ids"],
                provenance=value["provenance"], identity_keys=identity_keys(value["provenance"]),
                storage_options=sweep.storage_options,
            )
            out = []
            for s in store.missing_shards():
                rng = store.shard_range(s)
                key = f"{t.key} shard {s} (examples {rng.start}..{rng.stop - 1})"
                args = (*common(t), t.url, t.group, sweep.storage_options, s, sweep.token_budget, key)
                out.append(Task(key, t.model, "extract_shard", args, kind="unit", info=t.key))
            return out

        def events(ev: Any) -> None:
            display.on_event(ev)
            if on_event is not None:
                on_event(ev)

        # prepares first (they unblock the units), grouped by model: a replica serves one model's
        # targets one after another
        tasks = [Task(f"prepare {p.target.key}", p.target.model, "prepare", common(p.target), kind="prepare", info=p.target.key)
                 for p in todo]
        try:
            with display:
                rep = pool.run(tasks, on_done=on_done, on_event=events, on_tick=display.tick)
        finally:
            if own_pool:
                pool.close()
        failures = dict(rep.failures)
        units = sum(1 for v in rep.results.values() if isinstance(v, UnitResult))
        tokens = sum(v.tokens for v in rep.results.values() if isinstance(v, UnitResult))
        if progress:
            c = display.console
            c.print(display.summary())
            at = display.actor_table()
            if at is not None:
                c.print(at)
        report = _report(sweep, plan_sweep(sweep, extra), units, rep.seconds, rep.retries, rep.actor_deaths, failures, tokens)
    if failures:
        raise SweepFailed(report)
    return report


def _connected() -> bool:
    import sys

    ray = sys.modules.get("ray")
    return bool(ray is not None and ray.is_initialized())


def _report(sweep: Sweep, plan: SweepPlan, units: int, seconds: float, retries: int, deaths: int,
            failures: dict[str, str], tokens: int = 0) -> SweepReport:
    rows = [
        StatusRow(p.target.model.key, p.target.model.path, p.target.capture.name, p.target.dataset.name,
                  p.target.url, p.target.group, len(p.done), p.n_shards)
        for p in plan.targets
    ]
    total_done = sum(r.done for r in rows)
    return SweepReport(sweep.name, rows, units, total_done - units, tokens, seconds, retries, deaths, failures,
                       list(sweep.studies))
