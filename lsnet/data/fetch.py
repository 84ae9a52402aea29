"""The real COCO subsets by command: ``lsnet data fetch tiny-coco|coco-mini [--to DIR] [--from URL_OR_DIR]``.

The repository ships, per dataset, its annotation JSONs (small) and a manifest of its images
(``lsnet/data/catalog/<dir>/manifest.json``: the official COCO file name, the official image URL and the
SHA-256 of every file). Fetching

- writes ``DIR/annotations/*.json`` from the shipped copies and downloads every image to
  ``DIR/<split>/<file>`` (default ``DIR``: ``data/tiny_coco`` / ``data/coco_mini`` in the checkout);
- verifies each file against its SHA-256 before it gets its final name (downloads go to ``<file>.part``
  and are renamed only when they verify): a file whose hash differs is refused, with one line naming it;
- resumes: files already there and verified are kept, and an interrupted download continues from its
  ``.part`` (an HTTP ``Range`` request; a server that ignores it sends the whole file again);
- takes the images from a mirror with ``--from``: a base URL (``URL/train2017/<file>``) or a local
  directory with the same layout (``annotations/``, ``train2017/``, ``val2017/``).

A file that is already at its final name but whose hash differs is never overwritten (it may be the
user's): the command names it and stops short of replacing it. Pure Python (urllib, hashlib, threads):
no Ray, no MLflow.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from lsnet.errors import InputError

#: ``lsnet data fetch NAME`` -> the dataset's directory name (under ``data/`` and the catalog).
DATASETS: dict[str, str] = {"tiny-coco": "tiny_coco", "coco-mini": "coco_mini"}
CATALOG_DIR = Path(__file__).resolve().parent / "catalog"
REPO_ROOT = Path(__file__).resolve().parent.parent.parent
#: Where fetched datasets go by default: the checkout's git-ignored ``data/``.
DATA_ROOT = REPO_ROOT / "data"
MANIFEST_NAME = "manifest.json"
CHUNK = 1 << 16
#: failures printed one line each; the rest are counted
MAX_FAILURE_LINES = 10


@dataclass(frozen=True)
class ManifestFile:
    """One file of a dataset: its path inside the dataset directory (POSIX, e.g.
    ``train2017/000000391895.jpg``), its official URL (None for the shipped annotations), size, hash."""

    path: str
    sha256: str
    size: int
    url: str | None = None


@dataclass(frozen=True)
class DatasetManifest:
    name: str                           # the command's name, "tiny-coco"
    directory: str                      # "tiny_coco"
    annotations: tuple[ManifestFile, ...]
    images: tuple[ManifestFile, ...]
    #: where the shipped annotation JSONs are (``<catalog>/annotations/``)
    catalog_dir: Path


@dataclass
class FetchReport:
    target: Path
    fetched: list[str] = field(default_factory=list)   # newly written (downloaded / copied)
    kept: list[str] = field(default_factory=list)      # already there and verified
    failed: list[str] = field(default_factory=list)    # one line each, naming the file

    @property
    def ok(self) -> bool:
        return not self.failed


# ----------------------------------------------------------------------------------------------------
# The dataset catalog and the one-line instruction when data is missing
# ----------------------------------------------------------------------------------------------------

def load_manifest(name: str, catalog_root: Path | None = None) -> DatasetManifest:
    """The shipped manifest of ``name`` (``tiny-coco`` or ``coco-mini``)."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r} (one of: {', '.join(DATASETS)})")
    catalog = (catalog_root or CATALOG_DIR) / DATASETS[name]
    path = catalog / MANIFEST_NAME
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise InputError(f"{path}: the dataset manifest cannot be read ({err})") from err

    def files(key: str) -> tuple[ManifestFile, ...]:
        return tuple(ManifestFile(path=f["path"], sha256=f["sha256"], size=int(f["size"]), url=f.get("url"))
                     for f in data[key])

    return DatasetManifest(name=name, directory=DATASETS[name], annotations=files("annotations"),
                           images=files("images"), catalog_dir=catalog)


def default_dir(name: str) -> Path:
    """Where ``lsnet data fetch NAME`` puts the dataset by default: ``<checkout>/data/<dir>``."""
    return DATA_ROOT / DATASETS[name]


def fetch_instruction(name: str) -> str:
    return (f"run `lsnet data fetch {name}` (downloads it into data/{DATASETS[name]}; "
            f"`--from DIR` copies it from a local mirror)")


def dataset_of(path: str | os.PathLike) -> str | None:
    """The fetchable dataset that ``path`` lies in (``data/coco_mini/train2017`` -> ``coco-mini``), or None."""
    parts = Path(path).parts
    for name, directory in DATASETS.items():
        for i in range(len(parts) - 1):
            if parts[i] == "data" and parts[i + 1] == directory:
                return name
    return None


def missing_data_message(path: str | os.PathLike, what: str = "") -> str | None:
    """One line for a missing ``path`` of a fetchable dataset (None when ``path`` is not in one)."""
    name = dataset_of(path)
    if name is None:
        return None
    prefix = f"{what}: " if what else ""
    return f"{prefix}{path} is not there: {fetch_instruction(name)}"


def require_dataset_path(path: str | os.PathLike, what: str = "") -> Path:
    """``path`` when it exists; else an :class:`InputError` saying which ``lsnet data fetch`` to run
    (or plainly that it is missing, for a path outside the fetchable datasets)."""
    path = Path(path)
    if path.exists():
        return path
    message = missing_data_message(path, what)
    raise InputError(message or f"{what + ': ' if what else ''}{path} does not exist")


# ----------------------------------------------------------------------------------------------------
# Verification and transfer of one file
# ----------------------------------------------------------------------------------------------------

def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


class _Refused(Exception):
    """One file could not be fetched; the message is the report's line for it."""


def _part_path(final: Path) -> Path:
    return final.with_name(final.name + ".part")


def _install(part: Path, final: Path, entry: ManifestFile, origin: str) -> None:
    """Rename a complete ``.part`` to its final name if its hash is the manifest's, else delete it."""
    actual = sha256_of(part)
    if actual != entry.sha256:
        part.unlink()
        raise _Refused(f"{entry.path}: SHA-256 of the file from {origin} is {actual[:16]}…, the manifest "
                       f"says {entry.sha256[:16]}… (refused, not saved)")
    os.replace(part, final)


def _download(url: str, final: Path, entry: ManifestFile, timeout_s: float) -> None:
    part = _part_path(final)
    have = part.stat().st_size if part.exists() else 0
    if have > entry.size:  # not a prefix of this file: start again
        part.unlink()
        have = 0
    if have < entry.size:
        request = urllib.request.Request(url, headers={"Range": f"bytes={have}-"} if have else {})
        try:
            with urllib.request.urlopen(request, timeout=timeout_s) as response:
                resumed = have > 0 and response.status == 206
                with open(part, "ab" if resumed else "wb") as out:
                    have = have if resumed else 0
                    for chunk in iter(lambda: response.read(CHUNK), b""):
                        out.write(chunk)
                        have += len(chunk)
        except urllib.error.HTTPError as err:
            raise _Refused(f"{entry.path}: {url} answered HTTP {err.code} {err.reason}") from err
        except (urllib.error.URLError, OSError, TimeoutError) as err:
            reason = getattr(err, "reason", None) or err
            kept = f" ({have} of {entry.size} bytes kept in {part.name}; run again to resume)" if have else ""
            raise _Refused(f"{entry.path}: download from {url} failed: {reason}{kept}") from err
        if have < entry.size:
            raise _Refused(f"{entry.path}: {url} ended after {have} of {entry.size} bytes "
                           f"(kept in {part.name}; run again to resume)")
    _install(part, final, entry, url)


def _copy(source: Path, final: Path, entry: ManifestFile) -> None:
    if not source.is_file():
        raise _Refused(f"{entry.path}: not in the mirror ({source} does not exist)")
    part = _part_path(final)
    shutil.copyfile(source, part)
    _install(part, final, entry, str(source))


def _fetch_one(entry: ManifestFile, target: Path, source: str | None, timeout_s: float) -> bool:
    """Fetch one image; True when written, False when it was already there and verified."""
    final = target / entry.path
    if final.exists():
        actual = sha256_of(final)
        if actual == entry.sha256:
            return False
        raise _Refused(f"{entry.path}: {final} exists but its SHA-256 is {actual[:16]}…, the manifest says "
                       f"{entry.sha256[:16]}… (not overwritten: delete it and run again)")
    final.parent.mkdir(parents=True, exist_ok=True)
    if source is None:
        if not entry.url:
            raise _Refused(f"{entry.path}: the manifest has no URL for it (use --from)")
        _download(entry.url, final, entry, timeout_s)
    elif _is_url(source):
        _download(f"{source.rstrip('/')}/{entry.path}", final, entry, timeout_s)
    else:
        _copy(Path(source) / entry.path, final, entry)
    return True


def _is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


# ----------------------------------------------------------------------------------------------------
# A whole dataset
# ----------------------------------------------------------------------------------------------------

def fetch_dataset(manifest: DatasetManifest, target: str | os.PathLike | None = None, source: str | None = None,
                  workers: int = 8, timeout_s: float = 60.0,
                  progress: Callable[[str], None] | None = None) -> FetchReport:
    """Fetch ``manifest``'s dataset into ``target`` (default ``data/<dir>``); the images from their
    official URLs, or from ``source`` (a base URL or a local mirror directory). Never raises for one
    file: each failure is a line of the report (``report.ok`` is False then)."""
    target = Path(target) if target is not None else DATA_ROOT / manifest.directory
    if source is not None and not _is_url(source) and not Path(source).is_dir():
        raise InputError(f"--from {source}: neither an http(s) URL nor an existing directory")
    target.mkdir(parents=True, exist_ok=True)
    report = FetchReport(target=target)

    for entry in manifest.annotations:  # shipped in the repository: copied, verified like the images
        final = target / entry.path
        try:
            if final.exists() and sha256_of(final) == entry.sha256:
                report.kept.append(entry.path)
                continue
            if final.exists():
                raise _Refused(f"{entry.path}: {final} exists but differs from the shipped annotations "
                               "(not overwritten: delete it and run again)")
            final.parent.mkdir(parents=True, exist_ok=True)
            _copy(manifest.catalog_dir / entry.path, final, entry)
            report.fetched.append(entry.path)
        except _Refused as err:
            report.failed.append(str(err))

    total = len(manifest.images)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        futures = {pool.submit(_fetch_one, entry, target, source, timeout_s): entry for entry in manifest.images}
        for done, future in enumerate(concurrent.futures.as_completed(futures), 1):
            entry = futures[future]
            try:
                (report.fetched if future.result() else report.kept).append(entry.path)
            except _Refused as err:
                report.failed.append(str(err))
            if progress and (done % 10 == 0 or done == total):
                progress(f"{done}/{total} images")
    report.failed.sort()
    return report


def build_manifest(mirror: Path, name: str, directory: str, url_of: Callable[[dict], str | None]) -> dict:
    """The manifest of a mirror directory (``annotations/*.json`` + the images they list): how the shipped
    manifests were made (maintainers only). ``url_of(image_record)``: the official URL of an image."""
    annotations, images = [], {}
    for ann in sorted((mirror / "annotations").glob("*.json")):
        annotations.append(_entry(mirror, f"annotations/{ann.name}"))
        for record in json.loads(ann.read_text())["images"]:
            url = url_of(record)
            split = url.rsplit("/", 2)[-2] if url else None
            candidates = [f"{split}/{record['file_name']}"] if split else \
                sorted(str(p.relative_to(mirror)) for p in mirror.glob(f"*/{record['file_name']}"))
            if not candidates or not (mirror / candidates[0]).is_file():
                raise InputError(f"{ann}: image {record['file_name']} is not in {mirror}")
            images[candidates[0]] = {**_entry(mirror, candidates[0]), "url": url}
    return {"name": name, "directory": directory, "annotations": annotations,
            "images": [images[k] for k in sorted(images)]}


def _entry(root: Path, rel: str) -> dict:
    path = root / rel
    return {"path": rel, "sha256": sha256_of(path), "size": path.stat().st_size}
