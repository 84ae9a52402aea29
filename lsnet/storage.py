"""Where lsnet's files live: a local path or an object-store URI (``s3://bucket/key``), through ``pyarrow.fs``
(the filesystem layer Ray Train, Tune and Data use for their own ``storage_path``).

An object store is reached with the standard AWS variables only -- ``AWS_ENDPOINT_URL`` (an S3-compatible
server such as MinIO or moto; unset for AWS itself), ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
``AWS_DEFAULT_REGION`` -- which ``pyarrow.fs.S3FileSystem`` reads itself; lsnet has no endpoint setting.

A *location* is a string: a local path, or a URI. The helpers here read and write whole files at a
location; writes are atomic on both (a temporary file renamed into place locally, a single PUT on an
object store, which never shows a half-written object).

:class:`MirroredDir` keeps a local working copy of a directory whose home is a location: processes that
append to files (the MLflow journal, ``epochs.jsonl``) work on the copy and :meth:`MirroredDir.push`
the files that changed; a process on another node :meth:`MirroredDir.pull`-s them first.
"""
from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
from pathlib import Path

import pyarrow.fs as pafs

from lsnet.atomic import atomic_write_bytes
from lsnet.errors import LsnetError


class StorageError(LsnetError, OSError):
    """A location cannot be reached or read (the message names it)."""


def is_uri(location: str | Path | None) -> bool:
    """``s3://bucket/key`` (any ``scheme://``) rather than a local path."""
    return location is not None and "://" in str(location)


def resolve(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """``(filesystem, path)`` of a local path (absolute) or a ``pyarrow.fs`` URI (``s3://``, ``file://``...)."""
    text = str(location)
    if is_uri(text):
        try:
            fs, path = pafs.FileSystem.from_uri(text)
        except (OSError, ValueError) as err:
            raise StorageError(f"{text}: cannot open this storage location: {err}") from None
        return fs, path.rstrip("/") or "/"
    return pafs.LocalFileSystem(), os.path.abspath(text)


def join(location: str | Path, *parts: str) -> str:
    """``location / part / ...`` for a path or a URI (``s3://b/runs`` + ``x`` -> ``s3://b/runs/x``)."""
    text = str(location)
    if is_uri(text):
        return posixpath.join(text.rstrip("/"), *parts)
    return str(Path(text, *parts))


def name_of(location: str | Path) -> str:
    """The last component of a path or URI."""
    return posixpath.basename(str(location).rstrip("/"))


def exists(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    fs, path = resolve(location)
    return fs.get_file_info(path).type == pafs.FileType.File


def file_size(location: str | Path) -> int | None:
    """The size in bytes of a file, None when there is none."""
    fs, path = resolve(location)
    info = fs.get_file_info(path)
    return info.size if info.type == pafs.FileType.File else None


def read_bytes(location: str | Path) -> bytes:
    """The whole file; ``FileNotFoundError`` when there is none."""
    if not is_uri(location):
        return Path(location).read_bytes()
    fs, path = resolve(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such file")
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode("utf-8")


def write_bytes(location: str | Path, data: bytes, *, fsync: bool = False) -> None:
    """The whole file, atomically (temporary file + rename locally; one PUT on an object store)."""
    if not is_uri(location):
        atomic_write_bytes(location, data, fsync=fsync)
        return
    fs, path = resolve(location)
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode("utf-8"))


def upload_file(local: str | Path, location: str | Path) -> None:
    """Copy a local file to ``location`` (atomically, as :func:`write_bytes`)."""
    if not is_uri(location):
        if Path(local).resolve() != Path(location).resolve():
            Path(location).parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(location).with_name(f".{Path(location).name}.tmp-{os.getpid()}")
            shutil.copyfile(local, tmp)
            os.replace(tmp, location)
        return
    fs, path = resolve(location)
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        shutil.copyfileobj(src, dst, 8 << 20)


def download_file(location: str | Path, local: str | Path) -> Path:
    """Copy the file at ``location`` to the local path ``local`` (parent created)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    fs, path = resolve(location)
    tmp = local.with_name(f".{local.name}.tmp-{os.getpid()}")
    try:
        with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return local


def delete_file(location: str | Path) -> None:
    """Remove a file; nothing when there is none."""
    fs, path = resolve(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def list_dir(location: str | Path) -> list[tuple[str, bool]]:
    """``(name, is_directory)`` of the direct children of a directory, sorted; empty when it does not exist."""
    fs, path = resolve(location)
    try:
        infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    except NotADirectoryError:
        return []
    return sorted((posixpath.basename(i.path.rstrip("/")), i.type == pafs.FileType.Directory) for i in infos)


def list_files(location: str | Path) -> dict[str, int]:
    """Every file under a directory, recursively: ``{relative posix path: size}``."""
    fs, path = resolve(location)
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    prefix = path.rstrip("/") + "/"
    return {i.path[len(prefix):]: i.size for i in infos
            if i.type == pafs.FileType.File and i.path.startswith(prefix)}


def make_dirs(location: str | Path) -> None:
    """Create a local directory (object stores have none to create)."""
    if not is_uri(location):
        Path(location).mkdir(parents=True, exist_ok=True)


def sha256_of(location: str | Path, chunk: int = 8 << 20) -> tuple[str, int]:
    """(SHA-256 hex digest, size in bytes) of a file at a location."""
    h = hashlib.sha256()
    size = 0
    fs, path = resolve(location)
    with fs.open_input_stream(path) as f:
        while block := f.read(chunk):
            h.update(block)
            size += len(block)
    return h.hexdigest(), size


#: the local directory for working copies of stored directories (default: the system's temporary directory)
SCRATCH_ENV = "LSNET_SCRATCH_DIR"


def scratch_dir(location: str, purpose: str) -> Path:
    """A local directory of this machine for the working copy of ``location`` (stable per location):
    ``$LSNET_SCRATCH_DIR`` (default ``$TMPDIR``) ``/lsnet-<purpose>/<hash>-<name>``."""
    digest = hashlib.sha256(location.encode()).hexdigest()[:12]
    root = Path(os.environ.get(SCRATCH_ENV) or tempfile.gettempdir())
    return root / f"lsnet-{purpose}" / f"{digest}-{name_of(location)}"


class MirroredDir:
    """A directory whose home is ``location`` (a local path or a URI), worked on through ``local``.

    For a local location, ``local`` *is* the directory and push/pull do nothing. For a URI, ``local`` is
    a scratch copy on this machine: :meth:`pull` brings the stored files (except those whose relative
    path, or a part of it after a ``/``, starts with one of the ``skip`` prefixes); :meth:`push` uploads
    the files that changed since the last push or pull (by size and mtime) and deletes the stored copies
    of files removed here. One writer per file at a time is assumed (rank 0 writes the run's records;
    each worker its own ``rank{r}`` files).
    """

    def __init__(self, location: str | Path, local: Path | None = None, skip: tuple[str, ...] = ()):
        self.location = str(location)
        self.remote = is_uri(self.location)
        self.local = Path(local) if local is not None else (
            scratch_dir(self.location, "runs") if self.remote else Path(self.location))
        self.skip = skip
        self._seen: dict[str, tuple[int, int]] = {}

    def _skipped(self, rel: str) -> bool:
        # a prefix of the path or of any part of it after a "/" (``checkpoint_epoch_`` skips
        # ``trials/t1/checkpoint_epoch_0001/state.pt`` too); temporary files of a writer never travel
        return ".tmp-" in rel or any(rel.startswith(s) or f"/{s}" in rel for s in self.skip)

    def _local_files(self, under: str = "") -> dict[str, tuple[int, int]]:
        root = self.local / under if under else self.local
        if not root.exists():
            return {}
        out = {}
        for p in root.rglob("*"):
            if p.is_file():
                rel = p.relative_to(self.local).as_posix()
                if not self._skipped(rel):
                    st = p.stat()
                    out[rel] = (st.st_size, st.st_mtime_ns)
        return out

    def pull(self) -> int:
        """Replace the local copy with the stored files (created if need be); returns how many were
        fetched. Nothing for a local location."""
        if not self.remote:
            return 0
        self.local.mkdir(parents=True, exist_ok=True)
        stored = list_files(self.location)
        for rel in self._local_files():
            if rel not in stored:
                (self.local / rel).unlink(missing_ok=True)
        fetched = 0
        for rel in stored:
            if self._skipped(rel):
                continue
            download_file(join(self.location, rel), self.local / rel)
            fetched += 1
        self._seen = self._local_files()
        return fetched

    def push(self, under: str = "") -> int:
        """Upload what changed here (below ``under``, a relative directory, when given); returns the count."""
        if not self.remote:
            return 0
        now = self._local_files(under)
        changed = [rel for rel, sig in now.items() if self._seen.get(rel) != sig]
        for rel in changed:
            upload_file(self.local / rel, join(self.location, rel))
        prefix = under.rstrip("/") + "/" if under else ""
        for rel in [r for r in self._seen if r.startswith(prefix) and r not in now]:
            delete_file(join(self.location, rel))
            del self._seen[rel]
        self._seen.update({rel: now[rel] for rel in changed})
        return len(changed)

    def path(self, *parts: str) -> Path:
        """A path in the local copy."""
        return self.local.joinpath(*parts)

    def stored(self, *parts: str) -> str:
        """The location of a file at its home."""
        return join(self.location, *parts)
