"""Running a sweep: plan, create each store group in the driver, and let the actor pool fill the shards.

The order of things, each step only after the previous one succeeded:

1. parse and plan (datasets loaded, layer ranges checked, existing groups read, read-only): bad input
   stops here;
2. connect to Ray (an address where no cluster answers fails within seconds, naming it), all before any
   store or output folder is created;
3. per target with shards missing, one actor holding its model tokenizes the dataset (``prepare``)
   and sends back coords, token ids and provenance; the driver creates (or re-opens and checks) the
   store group with them;
4. the missing shards become work units of whole store shards (runs of consecutive shards up to the
   model's ``unit_tokens`` real tokens; one shard per unit by default on CPU replicas), so no two actors
   ever write one chunk; actors open the group and write their shards into it, and the store sets a
   shard's done flag only after its data is written. A re-run skips done shards (and whole done groups
   without loading their model).

The tokenized dataset of a target (its ``PreparedExtraction``) is made once, by its prepare task, and
shared with the units through the object store; the driver keeps only a reference to it. A prepare
dispatched after another target of the same dataset was prepared under an equal tokenization key (a
model with the same tokenizer) takes that target's token ids, after re-tokenizing a sample of rows.

Each model's units run only on actors of its resource shape (:class:`~mechdiff.cluster.pool.ReplicaShape`,
from its ``resources``); a shape that no node can hold is refused before any store is touched.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from mechdiff.errors import MechdiffError
from mechdiff.engine.groups import check_room, identity_keys
from mechdiff.cluster.sweep import (
    DEFAULT_GPU_UNIT_TOKENS, ModelSpec, StatusRow, Sweep, SweepError, SweepPlan, Target, TargetPlan, load_sweep,
    plan_sweep,
)

__all__ = ["run_sweep", "SweepReport", "SweepFailed", "group_shards", "actors_per_shape"]


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
    tokenizations_reused: int = 0  # targets that took another's token ids (same dataset, same tokenizer)

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("nan")


class SweepFailed(MechdiffError, RuntimeError):
    """Some units failed after their retries; ``.report`` has the rest, ``.report.failures`` the reasons."""

    def __init__(self, report: SweepReport):
        self.report = report
        lines = "\n  ".join(f"{k}: {v}" for k, v in report.failures.items())
        super().__init__(f"sweep {report.sweep}: {len(report.failures)} unit(s) failed:\n  {lines}")


def group_shards(shards: Sequence[int], shard_tokens: Callable[[int], int], unit_tokens: int | None) -> list[tuple[int, ...]]:
    """Work units from the shards left to do: runs of consecutive shards whose real tokens stay within
    ``unit_tokens`` (a shard over the budget is a unit alone); ``None``: one shard per unit. Shards stay the
    resume unit: each is written and flagged on its own."""
    units: list[list[int]] = []
    total = 0
    for s in sorted(shards):
        n = shard_tokens(s)
        cur = units[-1] if units else None
        if unit_tokens is not None and cur is not None and cur[-1] == s - 1 and total + n <= unit_tokens:
            cur.append(s)
            total += n
        else:
            units.append([s])
            total = n
    return [tuple(u) for u in units]


def actors_per_shape(units: dict[Any, int], fit: Callable[[Any], int], total: int | None) -> dict[Any, int]:
    """Replicas per shape. ``total`` None: as many as the cluster holds of each shape (shapes that do not
    fit side by side take turns: the pool releases a finished shape's idle actors), never more than its
    units. ``total``: that many in all (taken as given: an autoscaler may add nodes), shared out by units,
    at least one per shape."""
    if total is None:
        return {s: max(1, min(fit(s), n)) for s, n in units.items()}
    out = {s: 1 for s in units}
    for _ in range(max(0, total - len(units))):
        open_ = [s for s in units if out[s] < units[s]]
        if not open_:
            break
        best = max(open_, key=lambda s: units[s] / out[s])
        out[best] += 1
    return out


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

    from mechdiff.cluster.pool import (
        ActorPool, ReplicaShape, ResourceError, Task, UnitResult, check_shapes_fit, replicas_that_fit,
    )
    from mechdiff.cluster.progress import SweepProgress, TargetStats
    from mechdiff.cluster.ray_env import ray_session
    from mechdiff.engine.store import ActivationStore, consolidate

    res = sweep.resources
    # Ray first (an unreachable address fails here, in seconds, naming it): no store or folder is created
    # before the cluster answered
    with ray_session(address):
        own_pool = pool is None
        has_gpus = ray.cluster_resources().get("GPU", 0) > 0
        shape_of: dict[str, ReplicaShape] = {
            p.target.model.key: ReplicaShape.of(sweep.resources_of(p.target.model), has_gpus) for p in todo
        }
        # units route by shape, except on a caller's pool of one shape: that pool is the caller's choice
        by_shape = own_pool or len(pool.shapes) > 1
        if by_shape:
            models_of: dict[ReplicaShape, list[str]] = {}
            for k, sh in shape_of.items():
                models_of.setdefault(sh, []).append(k)
            try:
                check_shapes_fit(models_of)
            except ResourceError as e:
                raise SweepError(f"{sweep.file}: resources: {e}") from None
            if not own_pool:
                lacking = [f"{', '.join(m)} ({sh.describe()})" for sh, m in models_of.items() if sh not in pool.shapes]
                if lacking:
                    raise SweepError(f"{sweep.file}: the given pool has no actors for " + "; ".join(lacking))
        if own_pool:
            units: Counter = Counter()
            for p in todo:
                units[shape_of[p.target.model.key]] += p.missing  # an upper bound: a unit may hold several shards
            # An explicit count is taken as it is, even beyond what is up now: an autoscaler adds nodes
            # for replicas waiting for resources. Otherwise as many as the cluster holds.
            wanted = actors or res.actors
            counts = actors_per_shape(dict(units), lambda sh: replicas_that_fit(sh.num_cpus, sh.num_gpus), wanted)
            pool = ActorPool(shapes=counts, max_retries=res.max_retries)

        def shape(m: ModelSpec) -> ReplicaShape | None:
            return shape_of[m.key] if by_shape else None
        # every dataset goes to the object store once; the prepare tasks fetch it by reference
        refs = {name: ray.put(p.prompts) for name, p in {p.target.dataset.name: p for p in todo}.items()}
        by_key: dict[str, TargetPlan] = {p.target.key: p for p in todo}
        stats = [
            TargetStats(p.target.key, p.target.model.key, p.target.dataset.name, p.target.capture.name, p.n_shards, len(p.done))
            for p in plan.targets
        ]
        display = SweepProgress(f"sweep {sweep.name}", stats, console=console, enabled=progress, pool=pool)

        def prep_key(t: Target) -> str:
            # the actor caches its tokenized dataset under this key: hashing the dataset and the capture
            # keeps a long-lived pool from reusing a stale one
            ident = f"{by_key[t.key].prompts.hash}|{t.capture.spec!r}|{sweep.max_length}|{sweep.truncate}"
            return f"{t.key}@{hashlib.sha256(ident.encode()).hexdigest()[:16]}"

        made: set[str] = set()  # store roots whose metadata is consolidated once, after the pool has run
        # the first preparation under each tokenization key; a later prepare (a model with the same
        # tokenizer) takes its ids from it. Given at dispatch, so it holds what is done by then.
        tokenized: dict[str, list] = {}
        reused = 0

        def on_done(task: Task, prep: Any) -> list[Task]:
            nonlocal reused
            if task.kind != "prepare":
                return []
            p = by_key[task.info]
            t = p.target
            # room for what is left to write, not for the whole store
            n, size = len(prep.token_ids), sweep.shard_size
            left = n - sum(min(size, n - i * size) for i in p.done)
            check_room(t.url, ActivationStore.estimate_nbytes_for(left, prep.arrays))
            store = ActivationStore.create_or_open(
                t.url, t.group, n_examples=n, shard_size=sweep.shard_size,
                arrays=prep.arrays, coords=prep.coords, token_ids=prep.token_id_matrix(),
                provenance=prep.provenance, identity_keys=identity_keys(prep.provenance),
                storage_options=sweep.storage_options,
            )
            made.add(t.url)
            # the units fetch the tokenized dataset from the object store; this process keeps only the reference
            prep_ref = [ray.put(prep)]
            tokenized.setdefault(prep.tokenization_key, prep_ref)
            reused += prep.reused_tokens
            sh = shape_of[t.model.key]
            budget = sweep.resources_of(t.model).unit_tokens or (DEFAULT_GPU_UNIT_TOKENS if sh.num_gpus > 0 else None)
            n_tokens = np.asarray(prep.coords["n_tokens"])
            out = []
            for unit in group_shards(store.missing_shards(), lambda s: int(n_tokens[store.shard_range(s)].sum()), budget):
                first, last = store.shard_range(unit[0]), store.shard_range(unit[-1])
                what = f"shard {unit[0]}" if len(unit) == 1 else f"shards {unit[0]}-{unit[-1]}"
                key = f"{t.key} {what} (examples {first.start}..{last.stop - 1})"
                args = (prep_key(t), prep_ref, t.url, t.group, sweep.storage_options, unit, sweep.token_budget, key)
                out.append(Task(key, t.model, "extract_unit", args, kind="unit", info=t.key, shape=shape(t.model)))
            return out

        def events(ev: Any) -> None:
            display.on_event(ev)
            if on_event is not None:
                on_event(ev)

        # prepares first (they unblock the units), grouped by model: a replica serves one model's
        # targets one after another
        tasks = [Task(f"prepare {p.target.key}", p.target.model, "prepare",
                      (prep_key(p.target), [refs[p.target.dataset.name]], p.target.capture, sweep.max_length, sweep.truncate),
                      kind="prepare", info=p.target.key, shape=shape(p.target.model), keep_result=False,
                      late_args=lambda: (dict(tokenized),))
                 for p in todo]
        try:
            with display:
                rep = pool.run(tasks, on_done=on_done, on_event=events, on_tick=display.tick)
        finally:
            if own_pool:
                pool.close()
        failures = dict(rep.failures)
        for url in sorted(made):
            consolidate(url, sweep.storage_options)
        units = sum(v.n_shards for v in rep.results.values() if isinstance(v, UnitResult))  # shards written
        tokens = sum(v.tokens for v in rep.results.values() if isinstance(v, UnitResult))
        if progress:
            c = display.console
            c.print(display.summary())
            at = display.actor_table()
            if at is not None:
                c.print(at)
        report = _report(sweep, plan_sweep(sweep, extra), units, rep.seconds, rep.retries, rep.actor_deaths, failures, tokens)
        report.tokenizations_reused = reused
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
                  p.target.url, p.target.group, len(p.done), p.n_shards, sweep.describe_resources(p.target.model))
        for p in plan.targets
    ]
    total_done = sum(r.done for r in rows)
    return SweepReport(sweep.name, rows, units, total_done - units, tokens, seconds, retries, deaths, failures,
                       list(sweep.studies))
