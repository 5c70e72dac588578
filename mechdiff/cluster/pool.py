"""A Ray actor pool of model replicas that pulls tasks grouped by model, with bounded retries.

Each actor (:class:`ModelWorker`) holds at most one model at a time, loaded once and kept for every
task of that model; it switches model only when its own model has no queued work left. Tasks are
extraction units (one store shard of one model x dataset x capture), group preparations, or any
picklable ``fn(lm, *args)`` (the model-running steps of the studies: interventions, patching,
generation).

Failures: a task whose actor dies (SIGKILL, OOM, node loss) or that fails with an I/O error is queued
again, preferring another actor, up to ``max_retries`` times, then reported as failed with the
task's name and the last error. Any other exception is a bug or bad input that a retry would repeat:
it fails the task at once. Dead actors are replaced (bounded), so the pool keeps its size.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import ray

from mechdiff.errors import MechdiffError
from mechdiff.cluster.ray_env import FORWARDED_ENV
from mechdiff.cluster.sweep import CaptureEntry, ModelSpec

__all__ = ["ModelWorker", "ActorPool", "Task", "Slot", "PoolEvent", "PoolReport", "PoolError", "UnitResult", "replicas_that_fit"]


class PoolError(MechdiffError, RuntimeError):
    """Tasks failed after their retries; ``.failures`` maps each task's name to its last error."""

    def __init__(self, failures: dict[str, str]):
        self.failures = dict(failures)
        lines = [f"{k}: {v}" for k, v in failures.items()]
        super().__init__(f"{len(failures)} task(s) failed:\n  " + "\n  ".join(lines))


@dataclass
class UnitResult:
    """What an actor reports for one finished extraction unit."""

    shard: int
    examples: int
    tokens: int
    seconds: float
    pid: int
    cpu_seconds: float = 0.0  # the actor process's CPU time over the unit (all its threads)


# ---------------------------------------------------------------------------------------------
# the actor


@ray.remote(concurrency_groups={"monitor": 1})
class ModelWorker:
    """One model replica. Work methods run one at a time; ``info`` / ``live`` answer while it works."""

    def __init__(self, torch_threads: int, num_gpus: float) -> None:
        import torch
        from transformers.utils import logging as hf_logging

        torch.set_num_threads(torch_threads)
        hf_logging.disable_progress_bar()  # per-model loading bars would flood the driver's log
        self.torch_threads = torch_threads
        self.num_gpus = num_gpus
        self.lm = None
        self.model: ModelSpec | None = None
        self.preps: dict[str, Any] = {}
        self.stores: dict[tuple[str, str], Any] = {}
        self.current: str | None = None
        self.live_tokens = 0

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
        }

    @ray.method(concurrency_group="monitor")
    def live(self) -> tuple[str | None, int]:
        """The task running now and the tokens it has processed so far."""
        return self.current, self.live_tokens

    # -- model ------------------------------------------------------------------------------

    def _ensure(self, model: ModelSpec):
        import torch

        # work methods run in the actor's executor thread; OpenMP's thread count is per calling thread
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
        if self.num_gpus > 0:
            torch.cuda.empty_cache()
        kw: dict[str, Any] = {}
        if self.num_gpus > 1:
            kw["device_map"] = "auto"  # spread a model too big for one GPU over the reserved ones
        else:
            # Ray narrows CUDA_VISIBLE_DEVICES to this actor's GPU (a fraction of one is a shared GPU)
            kw["device"] = "cuda" if self.num_gpus > 0 else "cpu"
        self.lm = load_model(
            model.path, revision=model.revision, dtype=model.dtype, allow_pickle=model.allow_pickle,
            trust_remote_code=model.trust_remote_code, **kw,
        )
        self.model = model
        return self.lm

    def _prep(self, target_key: str, prompts_ref: list, capture: CaptureEntry, max_length: int | None, truncate: bool):
        prep = self.preps.get(target_key)
        if prep is None:
            from mechdiff.engine.extract import prepare

            prompts = ray.get(prompts_ref[0])  # wrapped in a list so Ray does not resolve it when cached
            prep = prepare(self.lm, prompts, capture.spec, max_length=max_length, truncate=truncate)
            self.preps[target_key] = prep
        return prep

    # -- work -------------------------------------------------------------------------------

    def prepare(self, model: ModelSpec, target_key: str, prompts_ref: list, capture: CaptureEntry,
                max_length: int | None, truncate: bool) -> dict[str, Any]:
        """Tokenize a dataset for a capture; return what the driver needs to create the store group."""
        self.current = f"prepare {target_key}"
        try:
            self._ensure(model)
            prep = self._prep(target_key, prompts_ref, capture, max_length, truncate)
            return {
                "n_examples": len(prep.token_ids),
                "arrays": prep.arrays,
                "coords": prep.coords,
                "token_ids": prep.token_id_matrix(),
                "provenance": prep.provenance,
            }
        finally:
            self.current = None

    def extract_shard(self, model: ModelSpec, target_key: str, prompts_ref: list, capture: CaptureEntry,
                      max_length: int | None, truncate: bool, url: str, group: str,
                      storage_options: dict | None, shard: int, token_budget: int | None, unit_key: str) -> UnitResult:
        """Capture one shard straight into the store; its done flag is set after its data is written."""
        from mechdiff.engine.extract import run_shards
        from mechdiff.engine.store import ActivationStore

        self.current, self.live_tokens = unit_key, 0
        try:
            self._ensure(model)
            prep = self._prep(target_key, prompts_ref, capture, max_length, truncate)
            store = self.stores.get((url, group))
            if store is None:
                store = ActivationStore.open(url, group, storage_options)
                if {a.name: a for a in store.arrays} != {a.name: a for a in prep.arrays} or store.n_examples != len(prep.token_ids):
                    raise ValueError(f"store {url} group {group} does not match what {model.key} prepares for {target_key}")
                self.stores[(url, group)] = store
            t0, c0 = time.perf_counter(), time.process_time()

            def count(n_tokens: int, n_rows: int) -> None:
                self.live_tokens += n_tokens

            _, tokens = run_shards(self.lm, prep, store, [shard], token_budget=token_budget, on_batch=count)
            return UnitResult(shard, len(store.shard_range(shard)), tokens, time.perf_counter() - t0, os.getpid(),
                              time.process_time() - c0)
        finally:
            self.current = None

    def call(self, model: ModelSpec, fn: Callable, args: tuple, kwargs: dict, key: str) -> Any:
        """Run ``fn(lm, *args, **kwargs)`` on this replica's model."""
        self.current = key
        try:
            return fn(self._ensure(model), *args, **kwargs)
        finally:
            self.current = None


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
    attempts: int = 0
    failed_on: set[int] = field(default_factory=set)
    errors: list[str] = field(default_factory=list)


@dataclass
class Slot:
    """One actor as the driver sees it."""

    id: int
    handle: Any
    alive: bool = True
    closed: bool = False  # stopped by close(), not dead
    pid: int | None = None
    node_ip: str | None = None
    node_id: str | None = None
    model: str | None = None  # key of the model it holds (or is loading)
    task: Task | None = None
    started: float = 0.0  # when its current task was dispatched
    units: int = 0
    tokens: int = 0
    busy_seconds: float = 0.0  # dispatch to result, model loading and start-up included
    compute_seconds: float = 0.0  # what the actor reports for its units
    live_tokens: int = 0
    failures: int = 0
    _info_ref: Any = None
    _live_ref: Any = None
    _live_at: float = 0.0


@dataclass
class PoolEvent:
    kind: str  # actor_started | dispatch | done | retry | failed | actor_died
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


def replicas_that_fit(num_cpus: float, num_gpus: float, limit: int | None = None) -> int:
    """How many replicas of this shape the connected cluster holds (at least 1 is required)."""
    res = ray.cluster_resources()
    n = int(res.get("CPU", 0) // num_cpus) if num_cpus > 0 else 10**6
    if num_gpus > 0:
        n = min(n, int(res.get("GPU", 0) // num_gpus))
    if n < 1:
        raise RuntimeError(
            f"a model replica needs {num_cpus:g} CPU and {num_gpus:g} GPU, but the cluster has "
            f"{res.get('CPU', 0):g} CPU and {res.get('GPU', 0):g} GPU in total"
            + ("; set resources.num_gpus: 0 to run on CPUs" if num_gpus > 0 and not res.get("GPU") else "")
        )
    return min(n, limit) if limit else n


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
    """``n_actors`` :class:`ModelWorker` replicas; :meth:`run` drives tasks through them.

    Use as a context manager (actors are killed on exit), or call :meth:`close`.
    """

    def __init__(
        self,
        n_actors: int,
        *,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        torch_threads: int | None = None,
        max_retries: int = 2,
        max_actor_restarts: int | None = None,
        env_vars: dict[str, str] | None = None,
    ) -> None:
        if n_actors < 1:
            raise ValueError("n_actors must be >= 1")
        self.n_actors = n_actors
        self.num_cpus = num_cpus
        self.num_gpus = num_gpus
        self.torch_threads = torch_threads or max(1, int(num_cpus))
        self.max_retries = max_retries
        self.max_actor_restarts = n_actors * (max_retries + 1) if max_actor_restarts is None else max_actor_restarts
        env = {k: os.environ[k] for k in FORWARDED_ENV if k in os.environ}
        env.update(env_vars or {})
        env.setdefault("OMP_NUM_THREADS", str(self.torch_threads))
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
        while len([s for s in self.slots if s.alive]) < self.n_actors:
            self._spawn()

    def _spawn(self) -> Slot:
        handle = ModelWorker.options(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_restarts=0,  # the pool replaces dead actors itself, and retries their tasks elsewhere
            runtime_env={"env_vars": self.env_vars} if self.env_vars else None,
        ).remote(self.torch_threads, self.num_gpus)
        slot = Slot(self._next_id, handle)
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
            s.pid, s.node_ip, s.node_id = i["pid"], i["node_ip"], i["node_id"]
        return {s.id: s.pid for s in live}

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
        failed task: see ``PoolReport.failures``."""
        self.start()
        t0 = time.perf_counter()
        retries0, deaths0 = self.retries, self.actor_deaths  # the pool's counters span its runs
        queues: dict[str, deque[Task]] = {}
        results: dict[str, Any] = {}
        failures: dict[str, str] = {}
        inflight: dict[Any, Slot] = {}
        emit = on_event or (lambda ev: None)

        def enqueue(t: Task, front: bool = False) -> None:
            q = queues.setdefault(t.model.key, deque())
            q.appendleft(t) if front else q.append(t)

        def fail(t: Task, why: str) -> None:
            failures[t.key] = f"failed after {t.attempts} attempt(s): {why}"
            emit(PoolEvent("failed", None, t, failures[t.key]))

        for t in tasks:
            enqueue(t)

        while True:
            self._collect_info(emit)
            # hand work to idle actors
            for slot in self.slots:
                # only actors that have started: one waiting for resources (e.g. for an autoscaler to
                # add a node) must not hold work that others could do
                if slot.alive and slot.task is None and slot.pid is not None:
                    t = self._pick(slot, queues)
                    if t is None:
                        continue
                    t.attempts += 1
                    slot.task, slot.started, slot.live_tokens = t, time.perf_counter(), 0
                    slot.model = t.model.key
                    ref = getattr(slot.handle, t.method).remote(t.model, *t.args)
                    inflight[ref] = slot
                    emit(PoolEvent("dispatch", slot, t))
            if not inflight:
                left = [t for q in queues.values() for t in q]
                if not left:
                    break
                if not any(s.alive for s in self.slots):
                    for t in left:
                        fail(t, "no actor left (restart budget used up)")
                    break
                time.sleep(poll)  # a replacement actor is starting; it takes the work on the next pass
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1, timeout=poll)
            for ref in ready:
                slot = inflight.pop(ref)
                t = slot.task
                assert t is not None
                elapsed = time.perf_counter() - slot.started
                slot.task, slot.live_tokens = None, 0
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
                results[t.key] = value
                emit(PoolEvent("done", slot, t, result=value))
                if on_done is not None:
                    try:
                        for nt in on_done(t, value) or ():
                            enqueue(nt)
                    except Exception as e:  # noqa: BLE001 - e.g. a store that does not match: that task fails
                        results.pop(t.key, None)
                        fail(t, f"{type(e).__name__}: {e}")
            self._poll_live(live_every)
            if on_tick is not None:
                on_tick()
        return PoolReport(results, failures, self.retries - retries0, self.actor_deaths - deaths0, time.perf_counter() - t0)

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
            new = self._spawn()
            new.model = None
            emit(PoolEvent("actor_started", new, None, f"replaces actor {slot.id}"))

    def _pick(self, slot: Slot, queues: dict[str, deque[Task]]) -> Task | None:
        """Own model first; otherwise the model with the most queued work per actor serving it."""
        alive = [s.id for s in self.slots if s.alive]

        def take(q: deque[Task]) -> Task | None:
            for i, t in enumerate(q):
                # a retry goes to an actor it has not failed on, while there is one
                if slot.id not in t.failed_on or all(a in t.failed_on for a in alive):
                    del q[i]
                    return t
            return None

        if slot.model is not None and queues.get(slot.model):
            t = take(queues[slot.model])
            if t is not None:
                return t
        serving: dict[str, int] = {}
        for s in self.slots:
            if s.alive and s is not slot and s.model is not None:
                serving[s.model] = serving.get(s.model, 0) + 1
        ranked = sorted(
            (k for k, q in queues.items() if q), key=lambda k: -len(queues[k]) / (serving.get(k, 0) + 1)
        )
        for k in ranked:
            t = take(queues[k])
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
                s.pid, s.node_ip, s.node_id = i["pid"], i["node_ip"], i["node_id"]
                emit(PoolEvent("actor_started", s, None, f"pid {s.pid} on {s.node_ip}"))

    def _poll_live(self, every: float) -> None:
        now = time.perf_counter()
        busy = [s for s in self.slots if s.alive and s.task is not None]
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
