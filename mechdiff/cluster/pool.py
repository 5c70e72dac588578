"""A Ray actor pool of model replicas that pulls tasks grouped by model, with bounded retries.

Each actor (:class:`ModelWorker`) holds at most one model at a time, loaded once and kept for every
task of that model; it switches model only when its own model has no queued work left. Tasks are
extraction units (whole store shards of one model x dataset x capture), group preparations, or any
picklable ``fn(lm, *args)`` (the model-running steps of the studies: interventions, patching,
generation).

Resource shapes: a pool holds one actor set per :class:`ReplicaShape` (CPUs, GPUs, layout), and a task
that names a shape runs only on actors of that shape (a 70B model never lands on a 1-GPU replica). When
actors of one shape wait for resources that idle actors of a finished shape hold, those idle actors are
released.

Throughput: an actor computes one unit while its persistent writer thread writes the previous one (the
pool keeps up to two units in flight per actor); a unit's result comes back only once its shards are
written and flagged, so a unit the driver counts as done is on storage.

Failures: a task whose actor dies (SIGKILL, OOM, node loss) or that fails with an I/O error is queued
again, preferring another actor, up to ``max_retries`` times, then reported as failed with the
task's name and the last error. Any other exception is a bug or bad input that a retry would repeat:
it fails the task at once. Dead actors are replaced (bounded), so the pool keeps its size.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import ray

from mechdiff.errors import MechdiffError
from mechdiff.cluster.ray_env import FORWARDED_ENV
from mechdiff.cluster.sweep import CaptureEntry, ModelSpec, Resources

__all__ = ["ModelWorker", "ActorPool", "Task", "Slot", "PoolEvent", "PoolReport", "PoolError", "UnitResult",
           "ReplicaShape", "ResourceError", "replicas_that_fit", "check_shapes_fit"]


class PoolError(MechdiffError, RuntimeError):
    """Tasks failed after their retries; ``.failures`` maps each task's name to its last error."""

    def __init__(self, failures: dict[str, str]):
        self.failures = dict(failures)
        lines = [f"{k}: {v}" for k, v in failures.items()]
        super().__init__(f"{len(failures)} task(s) failed:\n  " + "\n  ".join(lines))


class ResourceError(MechdiffError, ValueError):
    """A replica shape that no node of the cluster can hold (raised before any actor starts)."""


@dataclass(frozen=True)
class ReplicaShape:
    """What one actor reserves; the pool keeps one actor set per shape."""

    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int = 1
    tensor_parallel: int = 1
    pipeline_parallel: int = 1

    @classmethod
    def of(cls, res: Resources, cluster_has_gpus: bool) -> ReplicaShape:
        return cls(res.num_cpus, res.gpus(cluster_has_gpus), res.threads(), res.tensor_parallel, res.pipeline_parallel)

    def describe(self) -> str:
        layout = [f"{k} {v}" for k, v in (("tp", self.tensor_parallel), ("pp", self.pipeline_parallel)) if v > 1]
        return f"{self.num_gpus:g} GPU" + (f" ({', '.join(layout)})" if layout else "") + f", {self.num_cpus:g} CPU"


@dataclass
class UnitResult:
    """What an actor reports for one finished extraction unit (its shards written and flagged)."""

    shard: int  # the unit's first shard
    examples: int
    tokens: int
    seconds: float  # compute and the wait for its own writes (a write overlapping the next unit is not counted twice)
    pid: int
    cpu_seconds: float = 0.0  # the actor process's CPU time over the unit (all its threads)
    shards: tuple[int, ...] = ()  # every shard of the unit, those found already done on a retry included
    loads: tuple[str, ...] = ()  # the models this actor has loaded so far, in order (a reload shows twice)

    @property
    def n_shards(self) -> int:
        return len(self.shards) or 1


def _device(num_gpus: float) -> tuple[dict[str, Any], str]:
    """``load_model`` device arguments for a replica that Ray gave ``num_gpus``, and a line saying where it runs.

    Ray narrows CUDA_VISIBLE_DEVICES to the actor's GPUs; where torch sees no CUDA (a CPU node declaring
    GPUs, as in tests with fake resources), the replica runs on the CPU instead of failing in ``.to("cuda")``."""
    import torch

    if num_gpus <= 0:
        return {"device": "cpu"}, "cpu"
    if not torch.cuda.is_available():
        return {"device": "cpu"}, f"cpu (Ray reserved {num_gpus:g} GPU; torch sees no CUDA)"
    if num_gpus > 1 and torch.cuda.device_count() > 1:
        # the model's layers spread over the reserved GPUs
        return {"device_map": "auto"}, f"cuda x{torch.cuda.device_count()} (device_map auto)"
    return {"device": "cuda"}, "cuda"  # a fraction of one GPU is a shared GPU


# ---------------------------------------------------------------------------------------------
# the actor


@ray.remote(max_concurrency=2, concurrency_groups={"monitor": 1})
class ModelWorker:
    """One model replica. Its work methods may be called two at a time (a unit waiting for its writes while
    the next one computes), but compute is serialized by a lock; ``info`` / ``live`` answer while it works."""

    def __init__(self, shape: ReplicaShape) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(shape.torch_threads)
        hf_logging.disable_progress_bar()  # per-model loading bars would flood the driver's log
        self.shape = shape
        self.torch_threads = shape.torch_threads
        self.num_gpus = shape.num_gpus
        self.device_kw, self.device = _device(shape.num_gpus)
        self.lm = None
        self.model: ModelSpec | None = None
        self.preps: dict[str, Any] = {}
        self.stores: dict[tuple[str, str], Any] = {}
        self.current: str | None = None
        self.live_tokens = 0
        self.loads: list[str] = []
        self.work = threading.Lock()  # one forward pass at a time: both executor threads share the model
        self.writer = None  # the persistent ShardWriter, made on the first unit

    @ray.method(concurrency_group="monitor")
    def info(self) -> dict[str, Any]:
        import socket

        ctx = ray.get_runtime_context()
        return {
            "pid": os.getpid(),
            "node_id": ctx.get_node_id(),
            "node_ip": ray.util.get_node_ip_address(),
            "host": socket.gethostname(),
            "gpus": [str(g) for g in ray.get_gpu_ids()],
            "torch_threads": self.torch_threads,
            "device": self.device,
            "shape": self.shape,
            "loads": list(self.loads),
        }

    @ray.method(concurrency_group="monitor")
    def live(self) -> tuple[str | None, int]:
        """The task computing now and the tokens it has processed so far."""
        return self.current, self.live_tokens

    # -- model ------------------------------------------------------------------------------

    def _ensure(self, model: ModelSpec):
        import torch

        # work methods run in the actor's executor threads; OpenMP's thread count is per calling thread
        torch.set_num_threads(self.torch_threads)
        if self.model == model and self.lm is not None:
            return self.lm
        import gc

        from mechdiff.engine.models import load_model

        # Drop the old model first: two models may not fit the device together.
        self.lm = None
        self.model = None
        self.preps.clear()
        self.stores.clear()
        gc.collect()
        if self.num_gpus > 0 and torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.lm = load_model(
            model.path, revision=model.revision, dtype=model.dtype, allow_pickle=model.allow_pickle,
            trust_remote_code=model.trust_remote_code, **self.device_kw,
        )
        self.model = model
        self.loads.append(model.key)
        return self.lm

    def _prep(self, target_key: str, prep_ref: list):
        prep = self.preps.get(target_key)
        if prep is None:
            # tokenized once, by the target's prepare task; fetched from the object store
            prep = ray.get(prep_ref[0])  # wrapped in a list so Ray does not resolve it when cached
            self.preps[target_key] = prep
        return prep

    # -- work -------------------------------------------------------------------------------

    def prepare(self, model: ModelSpec, target_key: str, prompts_ref: list, capture: CaptureEntry,
                max_length: int | None, truncate: bool, shared: dict[str, list] | None = None):
        """Tokenize a dataset for a capture; returns the :class:`~mechdiff.engine.extract.PreparedExtraction`
        (the driver creates the store group with it and shares it with the units through the object store).

        ``shared``: the preparations made so far, by tokenization key; one under this model's key lends its
        token ids (a model with the same tokenizer) instead of a second tokenization."""
        from mechdiff.engine.extract import prepare

        with self.work:
            self.current = f"prepare {target_key}"
            try:
                lm = self._ensure(model)
                prompts = ray.get(prompts_ref[0])
                prep = prepare(lm, prompts, capture.spec, max_length=max_length, truncate=truncate,
                               reuse=_SharedTokenizations(shared or {}))
                self.preps[target_key] = prep
                return prep
            finally:
                self.current = None

    def extract_unit(self, model: ModelSpec, target_key: str, prep_ref: list, url: str, group: str,
                     storage_options: dict | None, shards: tuple[int, ...], token_budget: int | None,
                     unit_key: str) -> UnitResult:
        """Capture whole store shards straight into the store; returns once each is written and flagged (a
        shard's done flag is set after its data). The writes overlap the next unit's compute."""
        from mechdiff.engine.batching import resolve_token_budget
        from mechdiff.engine.extract import ShardWriter, capture_shard
        from mechdiff.engine.store import ActivationStore

        t0, c0 = time.perf_counter(), time.process_time()
        futures = []
        tokens = examples = 0
        with self.work:
            self.current, self.live_tokens = unit_key, 0
            try:
                lm = self._ensure(model)
                prep = self._prep(target_key, prep_ref)
                store = self.stores.get((url, group))
                if store is None:
                    store = ActivationStore.open(url, group, storage_options)
                    if {a.name: a for a in store.arrays} != {a.name: a for a in prep.arrays} or store.n_examples != len(prep.token_ids):
                        raise ValueError(f"store {url} group {group} does not match what {model.key} prepares for {target_key}")
                    self.stores[(url, group)] = store
                # a retried unit of several shards keeps those its killed attempt finished (one listing)
                todo = list(shards)
                if len(shards) > 1:
                    done = set(store.done_shards())
                    todo = [s for s in shards if s not in done]
                if self.writer is None:
                    self.writer = ShardWriter()
                budget = resolve_token_budget(token_budget, lm.device)

                def count(n_tokens: int, n_rows: int) -> None:
                    self.live_tokens += n_tokens

                for s in todo:
                    rng = store.shard_range(s)
                    bufs, n = capture_shard(lm, prep, rng, token_budget=budget, on_batch=count)
                    tokens += n
                    examples += len(rng)
                    futures.append(self.writer.put(s, bufs, store))  # blocks while two shards wait
            finally:
                self.current = None
        for f in futures:
            f.result()  # the write's error, if any, fails this unit (an OSError is retried)
        return UnitResult(shards[0], examples, tokens, time.perf_counter() - t0, os.getpid(), time.process_time() - c0,
                          tuple(shards), tuple(self.loads))

    def call(self, model: ModelSpec, fn: Callable, args: tuple, kwargs: dict, key: str) -> Any:
        """Run ``fn(lm, *args, **kwargs)`` on this replica's model."""
        with self.work:
            self.current = key
            try:
                return fn(self._ensure(model), *args, **kwargs)
            finally:
                self.current = None


class _SharedTokenizations(Mapping):
    """Other targets' preparations in the object store, seen as their tokenizations by key; only the one
    asked for is fetched."""

    def __init__(self, refs: dict[str, list]):
        self.refs = refs  # each ref wrapped in a list, so that Ray passes it unresolved

    def __getitem__(self, key: str):
        return ray.get(self.refs[key][0]).tokenization()

    def __iter__(self):
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)


# ---------------------------------------------------------------------------------------------
# the driver side


@dataclass
class Task:
    key: str  # unique and readable: names the unit in progress lines and failures
    model: ModelSpec
    method: str  # a ModelWorker method
    args: tuple = ()
    kind: str = "call"  # "unit" (counted as a sweep unit), "prepare" or "call"
    info: Any = None  # the caller's bookkeeping (e.g. the target)
    shape: ReplicaShape | None = None  # only actors of this shape take it; None: any actor
    keep_result: bool = True  # False: the result goes to on_done and is not kept (a prepare's token matrix)
    late_args: Callable[[], tuple] | None = None  # more arguments, made when it is dispatched (what is known by then)
    attempts: int = 0
    failed_on: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)
    started: float = 0.0  # when its current attempt was dispatched


@dataclass
class Slot:
    """One actor as the driver sees it."""

    id: int
    handle: Any
    alive: bool = True
    closed: bool = False  # stopped by close() or released, not dead
    pid: int | None = None
    node_ip: str | None = None
    node_id: str | None = None
    model: str | None = None  # key of the model it holds (or is loading)
    shape: ReplicaShape | None = None
    device: str | None = None  # where it runs, as the actor reports it
    tasks: list[Task] = field(default_factory=list)  # in flight, in dispatch order (the first one computes)
    units: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0  # dispatch to result, model loading and start-up included
    compute_seconds: float = 0.0  # what the actor reports for its units
    live_tokens: int = 0
    failures: int = 0
    _info_ref: Any = None
    _live_ref: Any = None
    _live_at: float = 0.0

    @property
    def task(self) -> Task | None:
        """The task it computes now (the first in flight)."""
        return self.tasks[0] if self.tasks else None

    @property
    def started(self) -> float:
        return self.tasks[0].started if self.tasks else 0.0


@dataclass
class PoolEvent:
    kind: str  # actor_started | dispatch | done | retry | failed | actor_died | actor_released
    slot: Slot | None
    task: Task | None = None
    detail: str = ""
    result: Any = None


@dataclass
class PoolReport:
    results: dict[str, Any]
    failures: dict[str, str]
    retries: int
    actor_deaths: int
    seconds: float


def _nodes() -> list[dict[str, float]]:
    """Each alive node's total resources (CPU, GPU, custom ones)."""
    return [dict(n.get("Resources") or {}) for n in ray.nodes() if n.get("Alive", n.get("alive", False))]


def _fits(node: Mapping[str, float], num_cpus: float, num_gpus: float) -> int:
    n = int(node.get("CPU", 0) // num_cpus) if num_cpus > 0 else 10**6
    if num_gpus > 0:
        n = min(n, int(node.get("GPU", 0) // num_gpus))
    return n


def replicas_that_fit(num_cpus: float, num_gpus: float, limit: int | None = None) -> int:
    """How many replicas of this shape the connected cluster's nodes hold (a replica lives on one node; at
    least 1 is required)."""
    nodes = _nodes()
    n = sum(_fits(node, num_cpus, num_gpus) for node in nodes)
    if n < 1:
        res = ray.cluster_resources()
        raise ResourceError(
            f"a model replica needs {num_cpus:g} CPU and {num_gpus:g} GPU, but the cluster has "
            f"{res.get('CPU', 0):g} CPU and {res.get('GPU', 0):g} GPU in total"
            + (f" (the largest node: {_largest(nodes)})" if len(nodes) > 1 else "")
            + ("; set resources.num_gpus: 0 to run on CPUs" if num_gpus > 0 and not res.get("GPU") else "")
        )
    return min(n, limit) if limit else n


def _largest(nodes: Sequence[Mapping[str, float]]) -> str:
    if not nodes:
        return "no node"
    big = max(nodes, key=lambda n: (n.get("GPU", 0), n.get("CPU", 0)))
    return f"{big.get('GPU', 0):g} GPU, {big.get('CPU', 0):g} CPU"


def check_shapes_fit(models_of: Mapping[ReplicaShape, Sequence[str]]) -> None:
    """Every shape fits on at least one node of the connected cluster; otherwise :class:`ResourceError` naming
    the models of each shape that none holds, and the largest node."""
    nodes = _nodes()
    bad = [(shape, models) for shape, models in models_of.items()
           if not any(_fits(n, shape.num_cpus, shape.num_gpus) >= 1 for n in nodes)]
    if bad:
        lines = [f"{', '.join(models)}: a replica needs {s.describe()}" for s, models in bad]
        no_gpu = any(s.num_gpus > 0 for s, _ in bad) and not any(n.get("GPU", 0) for n in nodes)
        raise ResourceError(
            "no node of the cluster can hold " + "; ".join(lines) + f" (the largest node has {_largest(nodes)})"
            + ("; set resources.num_gpus: 0 to run on CPUs" if no_gpu else "")
        )


def _retryable(e: BaseException) -> bool:
    """Errors another attempt (on another actor) can cure: lost actors, objects or I/O."""
    if isinstance(e, ray.exceptions.RayTaskError):
        from mechdiff.engine.models import ModelLoadError

        cause = getattr(e, "cause", None)
        # an OSError that says something is missing, forbidden or unloadable would fail again
        return isinstance(cause, (OSError, ConnectionError, TimeoutError)) and not isinstance(
            cause, (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, ModelLoadError)
        )
    return isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError))


def _describe(e: BaseException) -> str:
    if isinstance(e, ray.exceptions.RayTaskError):
        cause = getattr(e, "cause", None)
        if cause is not None:
            return f"{type(cause).__name__}: {cause}"
    if isinstance(e, ray.exceptions.RayActorError):
        return "its actor died (" + (str(e).strip().splitlines() or ["no detail"])[0][:200] + ")"
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


class ActorPool:
    """:class:`ModelWorker` replicas, ``n_actors`` of one shape or ``shapes={shape: n}``; :meth:`run` drives tasks
    through them.

    Use as a context manager (actors are killed on exit), or call :meth:`close`. ``pipeline``: units in flight
    per actor (2: one computing while the previous one's writes finish; 1: one at a time).
    """

    def __init__(
        self,
        n_actors: int | None = None,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        torch_threads: int | None = None,
        shapes: Mapping[ReplicaShape, int] | None = None,
        max_retries: int = 2,
        max_actor_restarts: int | None = None,
        env_vars: dict[str, str] | None = None,
        pipeline: int = 2,
    ) -> None:
        if shapes is None:
            if n_actors is None:
                raise ValueError("give n_actors (one shape) or shapes={shape: n}")
            shapes = {ReplicaShape(num_cpus, num_gpus, torch_threads or max(1, int(num_cpus))): n_actors}
        elif n_actors is not None:
            raise ValueError("give n_actors or shapes, not both")
        if not shapes or any(n < 1 for n in shapes.values()):
            raise ValueError("every shape needs n_actors >= 1")
        if pipeline not in (1, 2):
            raise ValueError("pipeline: 1 or 2 units in flight per actor")
        # bigger replicas are asked for first: placed before the small ones fragment the nodes
        self.shapes: dict[ReplicaShape, int] = dict(sorted(shapes.items(), key=lambda kv: (-kv[0].num_gpus, -kv[0].num_cpus)))
        self.n_actors = sum(self.shapes.values())
        first = next(iter(self.shapes))
        self.num_cpus, self.num_gpus, self.torch_threads = first.num_cpus, first.num_gpus, first.torch_threads
        self.pipeline = pipeline
        self.max_retries = max_retries
        self.max_actor_restarts = self.n_actors * (max_retries + 1) if max_actor_restarts is None else max_actor_restarts
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env.update(env_vars or {})
        self.env_vars = env
        self.slots: list[Slot] = []
        self.restarts = 0
        self.retries = 0
        self.actor_deaths = 0
        self._next_id = 0

    # -- actors -----------------------------------------------------------------------------

    def __enter__(self) -> ActorPool:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        for shape, n in self.shapes.items():
            while len([s for s in self.slots if s.alive and s.shape == shape]) < n:
                self._spawn(shape)

    def _spawn(self, shape: ReplicaShape) -> Slot:
        env = dict(self.env_vars)
        env.setdefault("OMP_NUM_THREADS", str(shape.torch_threads))
        handle = ModelWorker.options(
            num_cpus=shape.num_cpus,
            num_gpus=shape.num_gpus,
            max_restarts=0,  # the pool replaces dead actors itself, and retries their tasks elsewhere
            runtime_env={"env_vars": env},
        ).remote(shape)
        slot = Slot(self._next_id, handle, shape=shape)
        self._next_id += 1
        slot._info_ref = handle.info.remote()
        self.slots.append(slot)
        return slot

    def close(self) -> None:
        for s in self.slots:
            if s.alive:
                try:
                    ray.kill(s.handle)
                except Exception:
                    pass
                s.alive, s.closed = False, True

    def pids(self, timeout: float = 60.0) -> dict[int, int]:
        """slot id -> actor process id, for the live actors (waits for them to start)."""
        live = [s for s in self.slots if s.alive]
        infos = ray.get([s.handle.info.remote() for s in live], timeout=timeout)
        for s, i in zip(live, infos):
            s.pid, s.node_ip, s.node_id, s.device = i["pid"], i["node_ip"], i["node_id"], i["device"]
        return {s.id: s.pid for s in live}

    def _serves(self, slot: Slot, shape: ReplicaShape | None) -> bool:
        return shape is None or slot.shape == shape

    # -- running ----------------------------------------------------------------------------

    def map(self, fn: Callable, jobs: Sequence[tuple[ModelSpec, tuple]], *, keys: Sequence[str] | None = None,
            on_event: Callable[[PoolEvent], None] | None = None) -> list[Any]:
        """``[fn(lm_of(model), *args) for model, args in jobs]`` across the pool, with retries.

        ``fn`` must be picklable (a module-level function). Raises :class:`PoolError` naming the jobs
        that failed after their retries.
        """
        keys = list(keys) if keys is not None else [f"{fn.__name__}[{i}] on {m.key}" for i, (m, _) in enumerate(jobs)]
        if len(set(keys)) != len(keys):
            raise ValueError("job keys must be unique")
        tasks = [Task(k, m, "call", (fn, tuple(a), {}, k)) for k, (m, a) in zip(keys, jobs)]
        rep = self.run(tasks, on_event=on_event)
        if rep.failures:
            raise PoolError(rep.failures)
        return [rep.results[k] for k in keys]

    def run(
        self,
        tasks: Iterable[Task],
        *,
        on_done: Callable[[Task, Any], Iterable[Task] | None] | None = None,
        on_event: Callable[[PoolEvent], None] | None = None,
        on_tick: Callable[[], None] | None = None,
        poll: float = 0.25,
        live_every: float = 1.0,
    ) -> PoolReport:
        """Run ``tasks`` (and those ``on_done(task, result)`` returns) to completion; never raises for a
        failed task: see ``PoolReport.failures``. A task naming a shape the pool has none of is bad input:
        ValueError before anything runs (one that ``on_done`` returns fails by name)."""
        tasks = list(tasks)
        for t in tasks:
            if t.shape is not None and t.shape not in self.shapes:
                raise ValueError(f"task {t.key} needs replicas of shape {t.shape.describe()}; this pool has "
                                 + "; ".join(s.describe() for s in self.shapes))
        self.start()
        t0 = time.perf_counter()
        retries0, deaths0 = self.retries, self.actor_deaths  # the pool's counters span its runs
        queues: dict[str, deque[Task]] = {}
        qshape: dict[str, ReplicaShape | None] = {}  # a model's tasks all have its shape
        results: dict[str, Any] = {}
        failures: dict[str, str] = {}
        inflight: dict[Any, tuple[Slot, Task]] = {}
        emit = on_event or (lambda ev: None)

        def enqueue(t: Task, front: bool = False) -> None:
            q = queues.setdefault(t.model.key, deque())
            qshape[t.model.key] = t.shape
            q.appendleft(t) if front else q.append(t)

        def fail(t: Task, why: str) -> None:
            failures[t.key] = f"failed after {t.attempts} attempt(s): {why}"
            emit(PoolEvent("failed", None, t, failures[t.key]))

        def dispatch(slot: Slot, t: Task) -> None:
            t.attempts += 1
            t.started = time.perf_counter()
            if not slot.tasks:
                slot.live_tokens = 0
            slot.tasks.append(t)
            slot.model = t.model.key
            late = t.late_args() if t.late_args is not None else ()
            ref = getattr(slot.handle, t.method).remote(t.model, *t.args, *late)
            inflight[ref] = (slot, t)
            emit(PoolEvent("dispatch", slot, t))

        for t in tasks:
            enqueue(t)

        while True:
            self._collect_info(emit)
            # hand work to idle actors, and a second unit to those computing one (it computes while the
            # first one's writes finish)
            for slot in self.slots:
                # only actors that have started: one waiting for resources (e.g. for an autoscaler to
                # add a node) must not hold work that others could do
                if not (slot.alive and slot.pid is not None):
                    continue
                if not slot.tasks:
                    t = self._pick(slot, queues, qshape)
                    if t is not None:
                        dispatch(slot, t)
                if len(slot.tasks) == 1 and self.pipeline > 1 and slot.tasks[0].kind == "unit":
                    t = self._take(slot, queues.get(slot.model or "", deque()), units_only=True)
                    if t is not None:
                        dispatch(slot, t)
            self._fail_unservable(queues, qshape, fail)
            self._release_finished(queues, qshape, inflight, emit)
            if not inflight:
                left = [t for q in queues.values() for t in q]
                if not left:
                    break
                time.sleep(poll)  # a replacement actor is starting; it takes the work on the next pass
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=poll)
            for ref in ready:
                slot, t = inflight.pop(ref)
                elapsed = time.perf_counter() - t.started
                if t in slot.tasks:
                    slot.tasks.remove(t)
                slot.live_tokens = 0
                try:
                    value = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - every failure is classified below
                    why = _describe(e)
                    t.errors.append(why)
                    t.failed_on.add(slot.id)
                    slot.failures += 1
                    if isinstance(e, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)):
                        self._bury(slot, why, emit)
                    if _retryable(e) and t.attempts <= self.max_retries:
                        self.retries += 1
                        emit(PoolEvent("retry", slot, t, why))
                        enqueue(t, front=True)
                    else:
                        fail(t, why)
                    continue
                slot.busy_seconds += elapsed
                if isinstance(value, UnitResult):
                    slot.units += 1
                    slot.tokens += value.tokens
                    slot.compute_seconds += value.seconds
                results[t.key] = value if t.keep_result else None
                emit(PoolEvent("done", slot, t, result=value))
                if on_done is not None:
                    try:
                        for nt in on_done(t, value) or ():
                            if nt.shape is not None and nt.shape not in self.shapes:
                                fail(nt, f"no actor of shape {nt.shape.describe()} in this pool")
                            else:
                                enqueue(nt)
                    except Exception as e:  # noqa: BLE001 - e.g. a store that does not match: that task fails
                        results.pop(t.key, None)
                        fail(t, f"{type(e).__name__}: {e}")
                del value  # a prepare's token matrix is not held past its on_done
            self._poll_live(live_every)
            if on_tick is not None:
                on_tick()
        return PoolReport(results, failures, self.retries - retries0, self.actor_deaths - deaths0, time.perf_counter() - t0)

    def _fail_unservable(self, queues: dict[str, deque[Task]], qshape: dict[str, ReplicaShape | None],
                         fail: Callable[[Task, str], None]) -> None:
        """Queued work whose shape has no actor left fails by name (dead, restart budget used up); a shape whose
        actors were all released gets one again."""
        for k, q in queues.items():
            if q and not any(s.alive and self._serves(s, qshape[k]) for s in self.slots):
                shape = qshape[k]
                released = [s for s in self.slots if s.closed and self._serves(s, shape)]
                if released:
                    self._spawn(shape or released[0].shape or next(iter(self.shapes)))
                    continue
                while q:
                    fail(q.popleft(), "no actor left (restart budget used up)")

    def _release_finished(self, queues: dict[str, deque[Task]], qshape: dict[str, ReplicaShape | None],
                          inflight: dict[Any, tuple[Slot, Task]], emit: Callable[[PoolEvent], None]) -> None:
        """Idle actors of a shape with no work left give their resources to actors of another shape that wait
        for them (e.g. 1-GPU replicas done, a 4-GPU replica not yet placed). The next ``run`` starts them again."""
        waiting = {s.shape for s in self.slots if s.alive and s.pid is None}
        if not waiting:
            return
        busy = {qshape[k] for k, q in queues.items() if q} | {t.shape for _, t in inflight.values()}
        if None in busy or not (waiting & busy):
            return  # work that any actor may take, or the waiting actors have nothing to do either
        for s in self.slots:
            if s.alive and s.pid is not None and not s.tasks and s.shape not in busy and s.shape not in waiting:
                try:
                    ray.kill(s.handle)
                except Exception:
                    pass
                s.alive, s.closed = False, True
                emit(PoolEvent("actor_released", s, None, f"its shape ({s.shape.describe()}) has no work left"))

    def _bury(self, slot: Slot, why: str, emit: Callable[[PoolEvent], None]) -> None:
        if not slot.alive:
            return
        slot.alive = False
        self.actor_deaths += 1
        emit(PoolEvent("actor_died", slot, None, why))
        try:
            ray.kill(slot.handle)  # in case it is only unreachable
        except Exception:
            pass
        if self.restarts < self.max_actor_restarts:
            self.restarts += 1
            new = self._spawn(slot.shape or next(iter(self.shapes)))
            new.model = None
            emit(PoolEvent("actor_started", new, None, f"replaces actor {slot.id}"))

    def _take(self, slot: Slot, q: deque[Task], units_only: bool = False) -> Task | None:
        alive = [s.id for s in self.slots if s.alive]
        for i, t in enumerate(q):
            if units_only and t.kind != "unit":
                continue
            # a retry goes to an actor it has not failed on, while there is one
            if slot.id not in t.failed_on or all(a in t.failed_on for a in alive):
                del q[i]
                return t
        return None

    def _pick(self, slot: Slot, queues: dict[str, deque[Task]], qshape: dict[str, ReplicaShape | None]) -> Task | None:
        """Own model first; otherwise, among the models of its shape, the one with the most queued work per
        actor serving it."""
        if slot.model is not None and queues.get(slot.model) and self._serves(slot, qshape[slot.model]):
            t = self._take(slot, queues[slot.model])
            if t is not None:
                return t
        serving: dict[str, int] = {}
        for s in self.slots:
            if s.alive and s is not slot and s.model is not None:
                serving[s.model] = serving.get(s.model, 0) + 1
        ranked = sorted(
            (k for k, q in queues.items() if q and self._serves(slot, qshape[k])),
            key=lambda k: -len(queues[k]) / (serving.get(k, 0) + 1),
        )
        for k in ranked:
            t = self._take(slot, queues[k])
            if t is not None:
                return t
        return None

    def _collect_info(self, emit: Callable[[PoolEvent], None]) -> None:
        pending = [s for s in self.slots if s._info_ref is not None and s.alive]
        if not pending:
            return
        ready, _ = ray.wait([s._info_ref for s in pending], num_returns=len(pending), timeout=0)
        ready = set(ready)
        for s in pending:
            if s._info_ref in ready:
                ref, s._info_ref = s._info_ref, None
                try:
                    i = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - it died while starting (e.g. import or OOM)
                    self._bury(s, f"actor failed to start: {_describe(e)}", emit)
                    continue
                s.pid, s.node_ip, s.node_id, s.device = i["pid"], i["node_ip"], i["node_id"], i["device"]
                emit(PoolEvent("actor_started", s, None, f"pid {s.pid} on {s.node_ip}, {s.device}"))

    def _poll_live(self, every: float) -> None:
        now = time.perf_counter()
        busy = [s for s in self.slots if s.alive and s.tasks]
        refs = [s._live_ref for s in busy if s._live_ref is not None]
        if refs:
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
            ready = set(ready)
            for s in busy:
                if s._live_ref is not None and s._live_ref in ready:
                    try:
                        current, tokens = ray.get(s._live_ref)
                        if s.task is not None and current == s.task.key:
                            s.live_tokens = tokens
                    except Exception:
                        pass
                    s._live_ref = None
        for s in busy:
            if s._live_ref is None and now - s._live_at >= every:
                s._live_ref, s._live_at = s.handle.live.remote(), now
