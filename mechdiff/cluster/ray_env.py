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
import socket
import tempfile
import time
from typing import Iterator

from mechdiff.errors import MechdiffError

__all__ = ["connect", "check_reachable", "ClusterUnreachable", "loopback_only", "is_loopback", "LocalCluster",
           "FORWARDED_ENV", "CONNECT_TIMEOUT_S"]

#: Seconds an unreachable ``--address`` may take to fail (TCP connect, then a GCS / Ray client answer).
CONNECT_TIMEOUT_S = float(os.environ.get("MECHDIFF_RAY_CONNECT_TIMEOUT_S", "15"))


class ClusterUnreachable(MechdiffError, ConnectionError):
    """The Ray cluster at an address does not answer (or is no Ray cluster); ``.address`` names it."""

    def __init__(self, address: str, reason: str) -> None:
        self.address = address
        super().__init__(f"cannot reach the Ray cluster at {address}: {reason}")

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


def _split_host_port(hostport: str) -> tuple[str, int] | None:
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def _resolve(address: str) -> tuple[str, str]:
    """``(kind, host:port)`` for a user address: kind ``client`` (ray://) or ``gcs``; resolves ``auto``."""
    if address.startswith("ray://"):
        return "client", address.removeprefix("ray://").split("/", 1)[0]
    if "://" in address:
        raise ClusterUnreachable(address, "not a Ray address (use host:port, ray://host:10001 or auto)")
    if address == "auto":
        from ray._private.services import canonicalize_bootstrap_address

        try:
            found = canonicalize_bootstrap_address("auto")
        except Exception as e:  # noqa: BLE001 - Ray raises several kinds here
            raise ClusterUnreachable(address, str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__) from None
        if not found:
            raise ClusterUnreachable(address, "no running Ray cluster found (RAY_ADDRESS is unset and none runs here)")
        return "gcs", found
    return "gcs", address


def check_reachable(address: str, timeout: float | None = None) -> None:
    """Fail fast, with :class:`ClusterUnreachable` naming ``address``, unless a Ray cluster answers there.

    Two gates, within ``timeout`` seconds all told (default :data:`CONNECT_TIMEOUT_S`): a TCP connect
    to host:port (a dead port is refused at once, a dropped one times out), then one gRPC call that only
    a Ray GCS (``host:port``) or Ray client server (``ray://``) answers. Nothing is started or written.
    ``ray.init`` itself retries a dead GCS for minutes; this is what keeps ``--address`` bounded.
    """
    timeout = CONNECT_TIMEOUT_S if timeout is None else timeout
    deadline = time.monotonic() + timeout
    kind, hostport = _resolve(address)
    hp = _split_host_port(hostport)
    if hp is None:
        raise ClusterUnreachable(address, "expected host:port, ray://host:port or auto")
    host, port = hp
    at = "" if hostport == address else f" to {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=max(0.5, min(5.0, deadline - time.monotonic()))):
            pass
    except socket.timeout:
        raise ClusterUnreachable(address, f"TCP connect{at} timed out (no answer)") from None
    except OSError as e:
        raise ClusterUnreachable(address, f"TCP connect{at} failed ({e.strerror or e})") from None
    _check_grpc(address, kind, hostport, deadline)


def _check_grpc(address: str, kind: str, hostport: str, deadline: float) -> None:
    """The port is open: is it a Ray GCS / Ray client server? One call with a deadline, on Ray's own
    channel settings (TLS when Ray uses it)."""
    try:
        import grpc

        from ray._private.grpc_utils import init_grpc_channel
    except ImportError:  # pragma: no cover - Ray's internals moved: the TCP gate has to do
        return
    left = lambda: max(0.5, deadline - time.monotonic())  # noqa: E731
    channel = init_grpc_channel(hostport, options=[("grpc.enable_http_proxy", 0)], asynchronous=False)
    try:
        try:
            grpc.channel_ready_future(channel).result(timeout=left())
        except grpc.FutureTimeoutError:
            raise ClusterUnreachable(address, f"{hostport} accepts connections but no gRPC (Ray) server answers there") from None
        try:
            if kind == "client":
                from ray.core.generated import ray_client_pb2, ray_client_pb2_grpc

                ray_client_pb2_grpc.RayletDriverStub(channel).ClusterInfo(
                    ray_client_pb2.ClusterInfoRequest(type=ray_client_pb2.ClusterInfoType.PING), timeout=left()
                )
            else:
                from ray.core.generated import gcs_service_pb2, gcs_service_pb2_grpc

                gcs_service_pb2_grpc.NodeInfoGcsServiceStub(channel).GetClusterId(
                    gcs_service_pb2.GetClusterIdRequest(), timeout=left()
                )
        except (ImportError, AttributeError):  # pragma: no cover - generated stubs renamed: channel ready is enough
            return
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            if code not in (grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
                return  # a server that knows the call answered (e.g. it wants credentials): ray.init says more
            what = "Ray client server" if kind == "client" else "Ray GCS (head node)"
            raise ClusterUnreachable(address, f"no {what} answers at {hostport} ({code.name if code else 'error'}: {e.details() if hasattr(e, 'details') else e})") from None
    finally:
        channel.close()


@contextlib.contextmanager
def _bounded_gcs_retries(n: int) -> Iterator[None]:
    """ray.init retries a GCS client ``RAY_gcs_server_port_wait_time_s`` times (default 20, each up to ~40 s
    against a dead GCS); read at call time, so bound it for this call (unless the user set it)."""
    key = "RAY_gcs_server_port_wait_time_s"
    if key in os.environ:
        yield
        return
    os.environ[key] = str(n)
    try:
        yield
    finally:
        os.environ.pop(key, None)


def connect(address: str | None = None, *, num_cpus: int | None = None, num_gpus: int | None = None) -> bool:
    """Connect this process to Ray; returns True when this call did it (the caller then shuts it down).

    ``address=None`` starts a Ray on this machine (loopback only); otherwise joins the cluster at
    ``address`` (``host:port``, ``ray://host:10001`` or ``auto``). An existing connection is reused.
    An address where no Ray cluster answers raises :class:`ClusterUnreachable` within
    :data:`CONNECT_TIMEOUT_S` seconds (see :func:`check_reachable`), before anything else happens.
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
        check_reachable(address)
        try:
            # the GCS answered just now: one or two client attempts are plenty, and a GCS that dies in
            # between cannot keep ray.init retrying for many minutes
            with _bounded_gcs_retries(2):
                ray.init(address=address, logging_level=logging.WARNING)
        except (ConnectionError, TimeoutError, ValueError) as e:
            with contextlib.suppress(Exception):
                ray.shutdown()
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            raise ClusterUnreachable(address, first) from None
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
