"""A local training run listens on 127.0.0.1 only (issue 19 item 3).

Before: Ray Train's torch set-up let rank 0's torch.distributed rendezvous store (TCPStore) listen on
every interface, ``*:MASTER_PORT`` (``ss -ltnp`` during a 2-worker run); pipelines.process_group binds it
to the node's address, 127.0.0.1 for a local Ray.
"""
from __future__ import annotations

import ipaddress
import socket
import threading
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1
    return (mapped or address).is_loopback


class ListeningSockets:
    """Polls every listening TCP/UDP socket of process ``pid`` and its descendants (the local Ray's GCS,
    raylet, agents, workers) until stopped: {(pid, process name, ip, port)}."""

    def __init__(self, pid: int, poll_s: float = 0.3):
        self.pid = pid
        self.seen: set[tuple[int, str, str, int]] = set()
        self._stop = threading.Event()
        self._poll_s = poll_s
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self):
        import psutil

        try:
            me = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                processes = [me, *me.children(recursive=True)]
            except psutil.Error:
                processes = [me]
            for proc in processes:
                try:
                    name = proc.name()
                    for conn in proc.net_connections(kind="inet"):
                        if conn.status == psutil.CONN_LISTEN or (conn.type == socket.SOCK_DGRAM and not conn.raddr):
                            self.seen.add((proc.pid, name, conn.laddr.ip, conn.laddr.port))
                except psutil.Error:  # the process ended meanwhile
                    continue
            self._stop.wait(self._poll_s)


def test_a_local_training_run_listens_on_loopback_only(tmp_path):
    """``lsnet train`` as a user runs it (its own private local Ray, no --address): every socket that the
    command and its descendants listen on is a loopback one. A process of its own, so that no Ray an
    earlier test started (a `ray start` head, a session cluster) is in the picture."""
    import os
    import subprocess
    import sys

    from lsnet.data.synthetic import write_synthetic_coco
    from pipelines.preprocess import preprocess

    data = write_synthetic_coco(tmp_path / "synth", num_images=4, image_size=(128, 128), seed=0)
    preprocess(data.instances_json, data.image_dir, tmp_path / "shards", max_size=128, contour_points=(18,),
               executor="local", verbose=False)
    sets = [f"data.train_shards={tmp_path / 'shards'}", "data.val_shards=null",
            f"run.storage_path={tmp_path / 'runs'}", "train.epochs=1", "train.lr_steps=[1]", "run.num_workers=2",
            "run.resources_per_worker={CPU: 1}", "tracking.enabled=false"]
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "train", str(REPO_ROOT / "configs" / "tiny_bbox.yaml"),
                             "--name", "loopback", *[x for kv in sets for x in ("--set", kv)]],
                            cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    with ListeningSockets(proc.pid) as sockets:
        output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output[-3000:]
    assert (tmp_path / "runs" / "loopback" / "model_final.pt").exists(), output[-2000:]
    workers = {s for s in sockets.seen if s[1].startswith("ray::RayTrainWo")}
    # the sampling saw the process group up: each worker's Ray endpoint and Gloo listener, and rank 0's
    # rendezvous store (2 + 2 + 1), so the check below looked at the training itself
    assert len(workers) >= 5, sorted(workers)
    assert any(s[1] == "gcs_server" for s in sockets.seen) and any(s[1] == "raylet" for s in sockets.seen)
    outside = sorted(s for s in sockets.seen if not _is_loopback(s[2]))
    assert not outside, f"listening on more than loopback (pid, process, address, port): {outside}"
