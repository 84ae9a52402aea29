"""Servers the storage tests run on 127.0.0.1, each in its own process group, stopped at the end:

- :class:`MotoS3Server` -- an S3-compatible object store (``python -m moto.server``, in memory). Tests reach it
  exactly as users reach theirs: through the standard AWS variables (:data:`AWS_VARIABLES`), nothing else.

The fixtures built on it (``moto_server``, ``s3``) are in ``tests/conftest.py``; the MLflow server on
PostgreSQL (``tracking_server`` / ``mlflow_server``) is the product's own (pipelines/tracking/server.py).
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path

#: The storage tests that take minutes (a search and an ablation table on the bucket, two Ray nodes without a
#: shared disk) run when this variable is 1 (``LSNET_CLUSTER_TESTS=1 make test``); ``make test`` keeps the rest.
CLUSTER_TESTS_ENV = "LSNET_CLUSTER_TESTS"


def cluster_tests_enabled() -> bool:
    return os.environ.get(CLUSTER_TESTS_ENV) == "1"


#: The only settings an object store needs (pyarrow.fs, boto3 and Ray all read them).
AWS_VARIABLES = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_http(url: str, proc: subprocess.Popen, log: Path, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as resp:
                if resp.status < 500:
                    return
        except OSError:
            time.sleep(0.3)
    raise RuntimeError(f"{what} did not answer at {url} within {timeout_s:.0f}s: {log.read_text()[-3000:]}")


def _stop(proc: subprocess.Popen | None) -> None:
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (start_new_session)
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


@dataclass
class MotoS3Server:
    """``python -m moto.server`` on 127.0.0.1; :meth:`env` is what a client needs to reach it."""

    root: Path
    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "lsnet-test",
                "AWS_SECRET_ACCESS_KEY": "lsnet-test-secret", "AWS_DEFAULT_REGION": "us-east-1"}

    def start(self, timeout_s: float = 60.0) -> MotoS3Server:
        self.root.mkdir(parents=True, exist_ok=True)
        log_path = self.root / "moto.log"
        with log_path.open("ab") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        _wait_http(f"{self.endpoint}/moto-api/", self.proc, log_path, timeout_s, "moto server")
        return self

    def create_bucket(self, name: str | None = None) -> str:
        import boto3

        name = name or f"lsnet-{uuid.uuid4().hex[:12]}"
        env = self.env()
        boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"],
                     region_name=env["AWS_DEFAULT_REGION"]).create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        _stop(self.proc)
        self.proc = None


@dataclass
class S3Bucket:
    """A fresh bucket on the moto server; the AWS variables are set in this process while a test runs."""

    server: MotoS3Server
    name: str

    def uri(self, *keys: str) -> str:
        return "/".join([f"s3://{self.name}", *keys])

    def env(self) -> dict[str, str]:
        return self.server.env()

    def objects(self, prefix: str = "") -> list[str]:
        """The key of every object under ``prefix`` (what is really in the bucket), without the empty
        directory markers pyarrow leaves (``a/``)."""
        import boto3

        client = boto3.client("s3")  # the AWS variables of this process
        keys, token = [], None
        while True:
            kwargs = {"Bucket": self.name, "Prefix": prefix, **({"ContinuationToken": token} if token else {})}
            page = client.list_objects_v2(**kwargs)
            keys += [o["Key"] for o in page.get("Contents", []) if not o["Key"].endswith("/")]
            if not page.get("IsTruncated"):
                return sorted(keys)
            token = page["NextContinuationToken"]
