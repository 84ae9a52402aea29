"""``lsnet tracking-server DIR``: an MLflow tracking server on PostgreSQL, as teams run it, on this machine.

First use runs ``initdb`` in ``DIR/pgdata``; every start runs PostgreSQL (``pg_ctl``) and ``mlflow server``
with proxied artifacts in ``DIR/artifacts``, prints the tracking URI and serves until Ctrl-C (or SIGTERM),
then stops both (pipelines/tracking/server.py).
"""
from __future__ import annotations

import argparse
import signal
import time

from lsnet.errors import ServiceError
from pipelines.tracking.server import TrackingServer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dir", help="the server's directory: PostgreSQL cluster, artifacts, logs (created on first use)")
    parser.add_argument("--port", type=int, default=5000, help="the MLflow server's port (default 5000)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="interface to bind (default 127.0.0.1; on a cluster the head's address, so that "
                             "workers on other nodes reach it; PostgreSQL always stays on 127.0.0.1)")
    parser.add_argument("--workers", type=int, default=4, help="the MLflow server's worker processes (default 4)")
    parser.add_argument("--run-as", default="default", metavar="USER",
                        help="as root: the user PostgreSQL runs as (it refuses root; default postgres, else nobody)")


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def run(args: argparse.Namespace) -> int:
    server = TrackingServer(args.dir, host=args.host, port=args.port, workers=args.workers, run_as=args.run_as)
    previous = signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        print(f"starting PostgreSQL in {server.postgres.data} and mlflow server on port {args.port} ...", flush=True)
        server.start()
        print(f"MLflow tracking server: {server.uri}\n"
              f"  backend store: PostgreSQL {server.postgres.uri} (data {server.postgres.data})\n"
              f"  artifacts:     {server.artifacts} (proxied: clients upload through the server)\n"
              f"  logs:          {server.log}, {server.postgres.log}\n"
              f"point lsnet at it:  lsnet --tracking-uri {server.uri} train ...   "
              f"(or export MLFLOW_TRACKING_URI={server.uri})\n"
              f"Ctrl-C stops it.", flush=True)
        while (problem := server.alive()) is None:
            time.sleep(1)
        raise ServiceError(f"mlflow server stopped: {problem}")
    except KeyboardInterrupt:
        print("stopping the MLflow server and PostgreSQL ...", flush=True)
        return 0
    finally:
        server.stop()
        signal.signal(signal.SIGTERM, previous)
