"""Joining (or starting) the Ray cluster: shared by the TFHE and CKKS executors."""

from __future__ import annotations

import os
import socket

from gravel.errors import ClusterError

__all__ = ["check_address", "connect"]


def check_address(address: str) -> None:
    """Fail in seconds, not minutes, on an address where no Ray head listens."""
    if address in ("auto", "local") or address.startswith("ray://"):
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ClusterError(f"Ray address {address!r} is not HOST:PORT")
    try:
        socket.create_connection((host, int(port)), timeout=3).close()
    except OSError as exc:
        raise ClusterError(f"no Ray cluster answers at {address} ({exc.strerror or exc})") from exc


def connect(address: str | None = None) -> tuple[int, list[int]]:
    """Join the cluster at `address` (or RAY_ADDRESS), or start an embedded single-machine Ray
    where neither is given; a driver already connected stays so. Returns the cluster's CPUs and
    each live node's."""
    import ray

    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        check_address(address)
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False)
        except ConnectionError as exc:
            raise ClusterError(f"cannot join the Ray cluster at {address}: {exc}") from exc
    cpus = int(ray.cluster_resources().get("CPU", 0))
    node_cpus = [int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [cpus]
    return cpus, node_cpus
