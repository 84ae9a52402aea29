"""Ray Train's torch process group, with its rendezvous store bound to the node's address only.

Ray Train (2.60, ``ray/train/torch/config.py``, ``_TorchBackend.on_start``) sets ``MASTER_ADDR`` /
``MASTER_PORT`` on every worker and calls ``torch.distributed.init_process_group("env://")``. On rank 0
that creates torch's ``TCPStore`` server, which listens on *every* interface (``*:MASTER_PORT``, libuv's
``::`` bind) whatever ``MASTER_ADDR`` says -- measured with ``ss -ltnp`` during a local 2-worker run::

    LISTEN 0 4096 *:44365 *:* users:(("ray::RayTrainWo",pid=6991,fd=52))

so a laptop's training run accepted connections from the network. :class:`BoundTorchConfig` does the
same set-up with one difference: rank 0 opens the store's listening socket itself, on the address Ray
gave its node (``ray.util.get_node_ip_address()``: 127.0.0.1 for the local Ray of
``pipelines.ray_local``; the node's own IP on a cluster, which the other ranks connect to anyway), and
hands it to ``TCPStore(master_listen_fd=...)``; every rank then joins with
``init_process_group(store=...)``. On a loopback node, Gloo's own connections are pinned to the loopback
interface too (``GLOO_SOCKET_IFNAME``; without it Gloo binds to whatever the host name resolves to).
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass
from datetime import timedelta

from ray.train._internal.worker_group import WorkerGroup as V1WorkerGroup
from ray.train.torch import TorchConfig
from ray.train.torch.config import _set_torch_distributed_env_vars, _TorchBackend

#: Rank 0's listening socket of the store, opened by :func:`_open_store_socket` and handed to the
#: store by :func:`_join_process_group` (both run in the same worker process).
_STORE_LISTENER: socket.socket | None = None


def _open_store_socket() -> tuple[str, int]:
    """On rank 0: a listening socket on this node's Ray address; returns (address, port)."""
    global _STORE_LISTENER
    import ray

    address = ray.util.get_node_ip_address()
    family = socket.AF_INET6 if ipaddress.ip_address(address).version == 6 else socket.AF_INET
    _STORE_LISTENER = socket.create_server((address, 0), family=family, backlog=128)
    return address, _STORE_LISTENER.getsockname()[1]


def loopback_interface() -> str | None:
    """The name of the network interface that holds 127.0.0.1 (``lo`` on Linux, ``lo0`` on macOS)."""
    import psutil

    for name, addresses in psutil.net_if_addrs().items():
        if any(a.family == socket.AF_INET and a.address == "127.0.0.1" for a in addresses):
            return name
    return None


def _join_process_group(backend: str, world_rank: int, world_size: int, address: str, port: int,
                        timeout_s: int) -> None:
    """On every rank: the store (rank 0 serves it on its pre-bound socket), then the process group."""
    global _STORE_LISTENER
    import ray
    import torch.distributed as dist

    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = address, str(port)  # as Ray sets them
    if backend == "gloo" and "GLOO_SOCKET_IFNAME" not in os.environ \
            and ipaddress.ip_address(ray.util.get_node_ip_address()).is_loopback:
        interface = loopback_interface()
        if interface:
            os.environ["GLOO_SOCKET_IFNAME"] = interface
    if backend == "nccl" and not {"TORCH_NCCL_ASYNC_ERROR_HANDLING", "TORCH_NCCL_BLOCKING_WAIT"} & set(os.environ):
        os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] = "1"  # what Ray's set-up does: fail on a hung collective
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        listener, _STORE_LISTENER = _STORE_LISTENER, None
        if listener is None:
            raise RuntimeError("rank 0 has no store socket: _open_store_socket did not run in this worker")
        store = dist.TCPStore(address, port, world_size, is_master=True, timeout=timeout,
                              master_listen_fd=listener.detach())  # the store owns the descriptor now
    else:
        store = dist.TCPStore(address, port, world_size, is_master=False, timeout=timeout)
    dist.init_process_group(backend=backend, store=store, rank=world_rank, world_size=world_size,
                            timeout=timeout)


class _BoundTorchBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: BoundTorchConfig) -> None:
        import ray

        backend = backend_config.backend
        if backend not in ("gloo", "nccl"):  # hccl, TPU: Ray's own set-up
            super().on_start(worker_group, backend_config)
            return
        address, port = worker_group.execute_single(0, _open_store_socket)
        if not isinstance(worker_group, V1WorkerGroup):  # as Ray's set-up: V1 sets them itself
            worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, WORLD_SIZE, ...
        ray.get([worker_group.execute_single_async(rank, _join_process_group, backend=backend, world_rank=rank,
                                                   world_size=len(worker_group), address=address, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for rank in range(len(worker_group))])


@dataclass
class BoundTorchConfig(TorchConfig):
    """``TorchConfig`` (backend ``gloo`` or ``nccl``) whose rendezvous store listens on the rank-0 node's
    address only (127.0.0.1 for a local run), not on every interface."""

    @property
    def backend_cls(self):
        return _BoundTorchBackend
