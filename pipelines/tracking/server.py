"""An MLflow tracking server as teams run it, on one machine: a private PostgreSQL cluster as the backend
store and MLflow's artifact proxy (``--serve-artifacts``), both bound to 127.0.0.1 by default.

``lsnet tracking-server DIR`` (pipelines/cli/tracking_server.py) and the test suite's ``mlflow_server``
fixture use :class:`TrackingServer`. Everything lives under one directory ``DIR``:

- ``DIR/pgdata`` — the PostgreSQL cluster (``initdb`` on first use; later starts reuse it);
- ``DIR/pgpass`` — the database password (libpq's password-file format, mode 0600): the backend URI the
  MLflow server is given names no password, so none shows in the process list;
- ``DIR/run`` — PostgreSQL's unix socket directory (nothing of the machine's ``/var/run/postgresql``);
- ``DIR/artifacts`` — the artifacts the server proxies (``--artifacts-destination``);
- ``DIR/postgres.log``, ``DIR/mlflow.log`` — the two servers' logs.

PostgreSQL refuses to run as root: as root the cluster belongs to another user (``postgres`` where the
Debian package created it, else ``nobody``; ``run_as`` chooses) and its commands run through ``runuser``.
The MLflow server itself runs as the calling user and reaches the database over TCP on 127.0.0.1.
"""
from __future__ import annotations

import contextlib
import glob
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Self

from lsnet.errors import InputError, ServiceError

DATABASE, DB_USER = "mlflow", "lsnet"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on right now (the OS's choice)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _check_port_free(host: str, port: int) -> None:
    with socket.socket() as sock:
        try:
            sock.bind((host, port))
        except OSError as err:
            raise InputError(f"port {port} on {host}: {err.strerror} (another server listens there?): "
                             "choose another with --port") from None


def postgres_bin_dir() -> Path:
    """Where ``initdb`` and ``pg_ctl`` are: ``$LSNET_POSTGRES_BIN``, else the newest Debian
    ``/usr/lib/postgresql/*/bin``, else the directory of ``pg_ctl`` on ``PATH``."""
    candidates = [os.environ.get("LSNET_POSTGRES_BIN", "")]
    candidates += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                         if Path(p).parent.name.isdigit() else 0, reverse=True)
    on_path = shutil.which("pg_ctl")
    candidates += [str(Path(on_path).parent)] if on_path else []
    for candidate in candidates:
        if candidate and (Path(candidate) / "initdb").is_file() and (Path(candidate) / "pg_ctl").is_file():
            return Path(candidate)
    raise ServiceError("PostgreSQL not found (no initdb/pg_ctl in $LSNET_POSTGRES_BIN, /usr/lib/postgresql/*/bin "
                       "or PATH): install it (Debian: apt-get install postgresql)")


def default_run_as() -> str | None:
    """The user PostgreSQL runs as: None (the caller) unless the caller is root, which PostgreSQL refuses;
    then ``postgres`` (created by the Debian package) or else ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    raise ServiceError("running as root and neither user 'postgres' nor 'nobody' exists: PostgreSQL refuses "
                       "to run as root; pass --run-as USER")


def _wait_for(condition, deadline_s: float, what: str, failed=None, interval_s: float = 0.25):
    """Poll ``condition()`` until truthy (returned) or ``deadline_s`` passes; ``failed()`` returning a
    message stops early (a server that exited)."""
    end = time.monotonic() + deadline_s
    while True:
        value = condition()
        if value:
            return value
        problem = failed() if failed else None
        if problem:
            raise ServiceError(f"{what}: {problem}")
        if time.monotonic() > end:
            raise ServiceError(f"{what}: not ready after {deadline_s:.0f} s")
        time.sleep(interval_s)


def _log_tail(path: Path, lines: int = 3) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(text[-lines:])


class PostgresCluster:
    """A private PostgreSQL cluster in ``root`` listening on 127.0.0.1 only (see module doc)."""

    def __init__(self, root: str | Path, run_as: str | None = "default", port: int | None = None,
                 durable: bool = True):
        self.root = Path(root).resolve()
        self.durable = durable
        self.data = self.root / "pgdata"
        self.socket_dir = self.root / "run"
        self.log = self.root / "postgres.log"
        self.passfile = self.root / "pgpass"
        self.run_as = default_run_as() if run_as == "default" else run_as
        self.port = port
        self.bin = postgres_bin_dir()
        self.started = False

    # ---- helpers ----------------------------------------------------------------------------------
    def _cmd(self, *argv: str) -> list[str]:
        """A PostgreSQL command run as the cluster's owner."""
        return ["runuser", "-u", self.run_as, "--", *argv] if self.run_as else list(argv)

    def _run(self, *argv: str, timeout_s: float = 300) -> subprocess.CompletedProcess:
        proc = subprocess.run(self._cmd(*argv), check=False, capture_output=True, text=True, timeout=timeout_s,
                              stdin=subprocess.DEVNULL, cwd="/")
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip().splitlines()
            raise ServiceError(f"{Path(argv[0]).name} failed (exit {proc.returncode}): "
                               f"{detail[-1] if detail else 'no output'} (log: {self.log})")
        return proc

    def _chown(self, path: Path) -> None:
        if self.run_as:
            entry = pwd.getpwnam(self.run_as)
            os.chown(path, entry.pw_uid, entry.pw_gid)

    def password(self) -> str:
        return self.passfile.read_text().strip().rsplit(":", 1)[1]

    @property
    def initialized(self) -> bool:
        return (self.data / "PG_VERSION").is_file()

    # ---- life cycle -------------------------------------------------------------------------------
    def init(self) -> None:
        """``initdb`` on first use: superuser ``lsnet`` with a random password (scram-sha-256 over TCP)."""
        if self.initialized:
            if not self.passfile.is_file():
                raise InputError(f"{self.passfile}: missing (the database password of {self.data}); "
                                 "restore it or start over in an empty directory")
            return
        if self.data.exists() and any(self.data.iterdir()):
            raise InputError(f"{self.data}: exists, is not empty and holds no PostgreSQL cluster (no PG_VERSION)")
        if not self.root.exists():  # others may pass through (the cluster's owner), not list it
            self.root.mkdir(parents=True)
            self.root.chmod(0o711)
        if self.run_as:
            self._check_reachable()
        password = secrets.token_urlsafe(24)
        # libpq's password file, for the MLflow server's connections (only its owner may read it)
        fd = os.open(self.passfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(f"*:*:*:{DB_USER}:{password}\n")
        pwfile = self.root / ".initdb-password"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(password + "\n")
        try:
            self.data.mkdir(mode=0o700, exist_ok=True)
            self._chown(self.data)
            self._chown(pwfile)  # initdb reads it as the cluster's owner
            self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", DB_USER, "-E", "UTF8",
                      "--auth-host=scram-sha-256", "--auth-local=peer", f"--pwfile={pwfile}", "--no-instructions")
        finally:
            pwfile.unlink(missing_ok=True)

    def _check_reachable(self) -> None:
        """The cluster's owner must be able to enter ``root`` (a folder under /root is closed to others)."""
        probe = subprocess.run(["runuser", "-u", self.run_as, "--", "test", "-x", str(self.root)],
                               check=False, capture_output=True, stdin=subprocess.DEVNULL)
        if probe.returncode != 0:
            raise InputError(f"{self.root}: user {self.run_as} (who runs PostgreSQL, which refuses root) cannot "
                             "enter it: chmod o+x it (and its parents), choose another directory, or --run-as")

    def start(self, deadline_s: float = 300) -> None:
        self.init()
        self.socket_dir.mkdir(exist_ok=True)
        self._chown(self.socket_dir)
        if not self.log.exists():
            self.log.touch()
        self._chown(self.log)
        self.port = self.port or free_port()
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {shlex.quote(str(self.socket_dir))}"
        if not self.durable:  # a throw-away cluster (tests): no waiting on the disk, ~3x faster migrations
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-o", options,
                  "-w", "-t", str(int(deadline_s)), "start", timeout_s=deadline_s + 30)
        self.started = True
        self._ensure_database()

    def _connect(self, dbname: str):
        import psycopg2

        return psycopg2.connect(host="127.0.0.1", port=self.port, user=DB_USER, password=self.password(),
                                dbname=dbname, connect_timeout=10)

    def _ensure_database(self) -> None:
        conn = self._connect("postgres")
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE,))
                if cur.fetchone() is None:
                    cur.execute(f"CREATE DATABASE {DATABASE}")
        finally:
            conn.close()

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI of the MLflow database (psycopg2: SQLAlchemy 2.1 would pick psycopg 3; no password: libpq reads it from ``PGPASSFILE``)."""
        return f"postgresql+psycopg2://{DB_USER}@127.0.0.1:{self.port}/{DATABASE}"

    def stop(self) -> None:
        if not self.started:
            return
        self.started = False
        with contextlib.suppress(ServiceError, subprocess.TimeoutExpired):
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "-t", "120", "stop",
                      timeout_s=150)


class TrackingServer:
    """``mlflow server`` on a private PostgreSQL cluster, with proxied artifacts, under ``root``.

    Use as a context manager (or :meth:`start` / :meth:`stop`); :attr:`uri` is the tracking URI
    (``http://127.0.0.1:PORT``). Stopping ends the server's whole process group and the database.
    ``durable=False`` (tests): PostgreSQL without fsync, for a cluster thrown away afterwards."""

    def __init__(self, root: str | Path, host: str = "127.0.0.1", port: int | None = None, workers: int = 2,
                 run_as: str | None = "default", deadline_s: float = 300, durable: bool = True):
        self.root = Path(root).resolve()
        self.host, self.port, self.workers = host, port, workers
        self.deadline_s = deadline_s
        self.postgres = PostgresCluster(self.root, run_as=run_as, durable=durable)
        self.artifacts = self.root / "artifacts"
        self.log = self.root / "mlflow.log"
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.postgres.uri,
                "--serve-artifacts", "--artifacts-destination", str(self.artifacts),
                "--host", self.host, "--port", str(self.port), "--workers", str(self.workers)]

    def start(self) -> Self:
        self.root.mkdir(parents=True, exist_ok=True)
        self.artifacts.mkdir(exist_ok=True)
        if self.port:
            _check_port_free(self.host, self.port)  # before PostgreSQL starts: a clear line, nothing to undo
        self.port = self.port or free_port(self.host if self.host not in ("0.0.0.0", "::") else "127.0.0.1")
        self.postgres.start(self.deadline_s)
        try:
            env = {**os.environ, "PGPASSFILE": str(self.postgres.passfile)}
            env.pop("MLFLOW_TRACKING_URI", None)
            # MLflow 3's job runner (GenAI scorers, prompt optimisation: 8 more processes) is not used here
            env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
            with self.log.open("ab") as log:
                # its own session: stopping signals the whole group (the server's worker processes too)
                self.process = subprocess.Popen(self.command(), stdout=log, stderr=subprocess.STDOUT, env=env,
                                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=self.root)
            _wait_for(self._healthy, self.deadline_s, f"mlflow server on {self.uri}", failed=self._exited)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.uri}/health", timeout=5) as response:
                return response.status == 200
        except OSError:
            return False

    def _exited(self) -> str | None:
        if self.process is not None and self.process.poll() is not None:
            return f"exited with status {self.process.returncode}: {_log_tail(self.log)} (log: {self.log})"
        return None

    def alive(self) -> str | None:
        """None while the server runs, else why it stopped."""
        return self._exited()

    def stop(self, deadline_s: float = 60) -> None:
        """SIGTERM to the server's process group, SIGKILL after ``deadline_s``; then the database."""
        if self.process is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=deadline_s)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=30)
            # workers that outlived their parent in the same group
            end = time.monotonic() + deadline_s
            while _group_alive(self.process.pid) and time.monotonic() < end:
                time.sleep(0.2)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process = None
        self.postgres.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _proc_stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command name (state first), None when there is no such process."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text.rsplit(")", 1)[1].split()


def process_running(pid: int) -> bool:
    """Whether ``pid`` is a live process (an exited one waiting to be reaped — a zombie — is not)."""
    fields = _proc_stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _group_alive(pgid: int) -> bool:
    """Whether a live (not zombie) process of process group ``pgid`` is left."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            fields = _proc_stat(int(entry.name))
            if fields is not None and int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
                return True
    return False
