"""Connecting to Ray: a given cluster, or a Ray of this machine that stays on the loopback interface.

Ray replaces 127.0.0.1 / localhost by the machine's outward interface address (so that other nodes
could reach it), even for a cluster that never leaves this machine. For a single-machine Ray we want
every socket on 127.0.0.1; Ray does that when its multi-node mode is off, which we switch off only
for local clusters (``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, read by Ray at call time through
``ray_constants.ENABLE_RAY_CLUSTER``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Iterator

__all__ = ["connect", "loopback_only", "is_loopback", "LocalCluster", "FORWARDED_ENV"]

#: Environment variables the driver passes on to the actors (model hub behaviour).
FORWARDED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME", "HF_HUB_CACHE", "HF_DATASETS_OFFLINE")


def is_loopback(address: str | None) -> bool:
    if not address:
        return False
    host = address.split("://", 1)[-1].rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def loopback_only() -> None:
    """Keep Ray on 127.0.0.1 in this process and the processes it starts."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray._private.ray_constants as rc

    if hasattr(rc, "ENABLE_RAY_CLUSTER"):
        rc.ENABLE_RAY_CLUSTER = False  # ray was imported before the variable was set


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Connect this process to Ray; returns True when this call did it (the caller then shuts it down).

    ``address=None`` starts a Ray on this machine (loopback only); otherwise joins the cluster at
    ``address`` (``host:port``, ``ray://host:10001`` or ``auto``). An existing connection is reused.
    """
    import logging

    import ray

    if ray.is_initialized():
        return False
    if address is None or is_loopback(address):
        loopback_only()
    if address is None:
        ray.init(num_cpus=num_cpus, num_gpus=num_gpus, include_dashboard=False, logging_level=logging.WARNING)
    else:
        try:
            ray.init(address=address, logging_level=logging.WARNING)
        except ConnectionError as e:
            raise ConnectionError(f"cannot reach the Ray cluster at {address}: {e}") from None
    return True


class LocalCluster:
    """A Ray cluster of ``nodes`` nodes on this machine (a head and worker nodes, each its own raylet
    and worker processes), on 127.0.0.1 only, in a private temp dir; this process is its driver.

    For tests and benchmarks: ``with LocalCluster(nodes=2, cpus_per_node=1) as c: ... c.address``.
    Leaving stops exactly the processes it started.
    """

    def __init__(self, nodes: int = 2, cpus_per_node: int = 1, object_store_mb: int = 200) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.nodes = nodes
        self.cpus_per_node = cpus_per_node
        self.object_store_mb = object_store_mb
        self.cluster = None
        self._tmp: str | None = None
        self._old_tmp: str | None = None

    @property
    def address(self) -> str:
        assert self.cluster is not None, "LocalCluster is not started"
        return self.cluster.address

    def __enter__(self) -> LocalCluster:
        import ray
        from ray.cluster_utils import Cluster

        if ray.is_initialized():
            raise RuntimeError("this process is already connected to Ray; shut it down first")
        loopback_only()
        # A private RAY_TMPDIR: sessions, sockets and the "current cluster" file of other Ray users of
        # this machine are left alone. Short, since unix socket paths are limited to ~107 bytes.
        self._tmp = tempfile.mkdtemp(prefix="mdray", dir="/tmp")
        self._old_tmp = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = self._tmp
        node = dict(num_cpus=self.cpus_per_node, node_ip_address="127.0.0.1",
                    object_store_memory=self.object_store_mb * 2**20)
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args=dict(node, include_dashboard=False))
            for _ in range(self.nodes - 1):
                self.cluster.add_node(**node)
            self.cluster.wait_for_nodes()
            ray.init(address=self.cluster.address)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc) -> None:
        import ray

        with contextlib.suppress(Exception):
            ray.shutdown()
        if self.cluster is not None:
            with contextlib.suppress(Exception):
                self.cluster.shutdown()
            self.cluster = None
        if self._old_tmp is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = self._old_tmp
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None


@contextlib.contextmanager
def ray_session(address: str | None = None, **kw) -> Iterator[bool]:
    """``connect`` for the length of a block; shuts Ray down after only if it connected."""
    import ray

    started = connect(address, **kw)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()
