"""``lsnet data fetch`` (issue 19): download, verify, resume, refuse; a local mirror; the shipped catalog.

Every network test talks to an ``http.server`` on 127.0.0.1 in a thread of the test (no internet here),
serving a small mirror written by the test (or a copy of the developers' ../shared data when present).
"""
from __future__ import annotations

import hashlib
import http.server
import json
import os
import re
import shutil
import subprocess
import threading
from pathlib import Path

import pytest

from lsnet.data import fetch
from lsnet.errors import InputError

REPO_ROOT = Path(__file__).resolve().parent.parent


class _MirrorHandler(http.server.SimpleHTTPRequestHandler):
    """Serves ``server.root``; honours ``Range: bytes=N-`` when ``server.honour_range``; sends only the
    first ``server.cut[path]`` bytes of a file once (then drops the connection), to interrupt a download."""

    def translate_path(self, path):
        return str(self.server.root / path.split("?")[0].lstrip("/"))

    def do_GET(self):
        self.server.requests.append((self.path, self.headers.get("Range")))
        file = Path(self.translate_path(self.path))
        if not file.is_file():
            self.send_error(404, "Not Found")
            return
        data = file.read_bytes()
        start, status = 0, 200
        wanted = self.headers.get("Range")
        if wanted and self.server.honour_range:
            start, status = int(wanted.removeprefix("bytes=").rstrip("-")), 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        cut = self.server.cut.pop(self.path, None)
        self.wfile.write(body if cut is None else body[:cut])
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True

    def log_message(self, *args):
        pass


@pytest.fixture
def serve():
    """``serve(root)`` -> (base URL, server) of an HTTP server on 127.0.0.1 serving ``root``."""
    servers = []

    def start(root: Path, honour_range: bool = True):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _MirrorHandler)
        server.root, server.honour_range, server.cut, server.requests = Path(root), honour_range, {}, []
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}", server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_proxy_for_loopback(monkeypatch):
    monkeypatch.setenv("NO_PROXY", "127.0.0.1")
    monkeypatch.setenv("no_proxy", "127.0.0.1")


def _mirror(root: Path) -> Path:
    """A mirror of a 3-image dataset in the COCO layout (images of different sizes, random bytes)."""
    images = {"train2017/000000000001.jpg": 70_000, "train2017/000000000002.jpg": 5_000,
              "val2017/000000000003.jpg": 130_001}
    records = []
    for i, (rel, size) in enumerate(images.items(), 1):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(os.urandom(size))
        records.append({"id": i, "file_name": rel.split("/")[1], "width": 8, "height": 8,
                        "coco_url": f"http://images.cocodataset.org/{rel}"})
    (root / "annotations").mkdir()
    (root / "annotations" / "instances_mini.json").write_text(json.dumps({"images": records}))
    return root


def _manifest(mirror: Path, catalog: Path, url_base: str | None = None) -> fetch.DatasetManifest:
    """The manifest of ``mirror`` (official URLs, or ``url_base`` standing in for the COCO server) written
    as a catalog the way the shipped ones are, and loaded back."""
    data = fetch.build_manifest(mirror, "tiny-coco", "tiny_coco",
                                lambda r: r["coco_url"].replace("http://images.cocodataset.org", url_base)
                                if url_base else r["coco_url"])
    (catalog / "tiny_coco" / "annotations").mkdir(parents=True)
    shutil.copy(mirror / "annotations" / "instances_mini.json", catalog / "tiny_coco" / "annotations")
    (catalog / "tiny_coco" / "manifest.json").write_text(json.dumps(data))
    return fetch.load_manifest("tiny-coco", catalog_root=catalog)


def _same_tree(a: Path, b: Path) -> None:
    files = sorted(str(p.relative_to(a)) for p in a.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(b)) for p in b.rglob("*") if p.is_file())
    for rel in files:
        assert (a / rel).read_bytes() == (b / rel).read_bytes(), rel


def test_fetch_from_the_manifest_urls_then_nothing_to_do(tmp_path, serve):
    mirror = _mirror(tmp_path / "mirror")
    base, server = serve(mirror)
    manifest = _manifest(mirror, tmp_path / "catalog", url_base=base)
    assert [f.path for f in manifest.images] == ["train2017/000000000001.jpg", "train2017/000000000002.jpg",
                                                 "val2017/000000000003.jpg"]
    assert manifest.images[0].url == f"{base}/train2017/000000000001.jpg"
    assert manifest.images[2].sha256 == hashlib.sha256((mirror / "val2017/000000000003.jpg").read_bytes()).hexdigest()

    report = fetch.fetch_dataset(manifest, tmp_path / "out", workers=2)
    assert report.ok and len(report.fetched) == 4 and not report.kept
    _same_tree(mirror, tmp_path / "out")
    assert sorted(path for path, _ in server.requests) == ["/train2017/000000000001.jpg",
                                                           "/train2017/000000000002.jpg", "/val2017/000000000003.jpg"]
    server.requests.clear()
    again = fetch.fetch_dataset(manifest, tmp_path / "out")  # verified files are kept, nothing downloaded
    assert again.ok and len(again.kept) == 4 and not again.fetched and not server.requests


@pytest.mark.parametrize("honour_range", [True, False], ids=["range", "server-ignores-range"])
def test_an_interrupted_download_resumes(tmp_path, serve, honour_range):
    mirror = _mirror(tmp_path / "mirror")
    base, server = serve(mirror, honour_range=honour_range)
    manifest = _manifest(mirror, tmp_path / "catalog")
    out = tmp_path / "out"
    server.cut["/val2017/000000000003.jpg"] = 50_000  # the connection drops after 50 kB of 130 kB
    first = fetch.fetch_dataset(manifest, out, source=base)
    assert len(first.failed) == 1
    assert first.failed[0].startswith("val2017/000000000003.jpg: ") and "run again to resume" in first.failed[0]
    assert not (out / "val2017/000000000003.jpg").exists()  # only verified files get their final name
    assert (out / "val2017/000000000003.jpg.part").stat().st_size == 50_000
    server.requests.clear()
    second = fetch.fetch_dataset(manifest, out, source=base)
    assert second.ok and second.fetched == ["val2017/000000000003.jpg"] and len(second.kept) == 3
    assert server.requests == [("/val2017/000000000003.jpg", "bytes=50000-")]
    assert not (out / "val2017/000000000003.jpg.part").exists()
    _same_tree(mirror, out)


def test_a_hash_mismatch_is_refused_with_one_line_naming_the_file(tmp_path, serve, capsys, monkeypatch):
    from pipelines.cli import main

    mirror = _mirror(tmp_path / "mirror")
    manifest = _manifest(mirror, tmp_path / "catalog")
    monkeypatch.setattr(fetch, "CATALOG_DIR", tmp_path / "catalog")
    bad = mirror / "train2017/000000000002.jpg"
    bad.write_bytes(b"\xff" + bad.read_bytes()[1:])  # one byte changed on the server
    base, _ = serve(mirror)
    out = tmp_path / "out"
    assert main(["data", "fetch", "tiny-coco", "--to", str(out), "--from", base]) == 1
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and err[0].startswith("lsnet data fetch: train2017/000000000002.jpg: SHA-256 of the file "
                                                f"from {base}/train2017/000000000002.jpg is ")
    assert f"the manifest says {manifest.images[1].sha256[:16]}" in err[0] and "refused" in err[0]
    assert err[1].startswith("lsnet data fetch: 1 of 4 files failed (3 fetched")
    assert not (out / "train2017/000000000002.jpg").exists() and not (out / "train2017/000000000002.jpg.part").exists()
    assert (out / "train2017/000000000001.jpg").exists()

    # a file already at its final name with other content is the user's: named, never overwritten
    mine = out / "train2017/000000000001.jpg"
    mine.write_bytes(b"my own file")
    report = fetch.fetch_dataset(manifest, out, source=str(mirror))
    line = next(f for f in report.failed if f.startswith("train2017/000000000001.jpg: "))
    assert "exists but its SHA-256" in line and "not overwritten" in line
    assert mine.read_bytes() == b"my own file"


def test_missing_files_over_http_and_in_a_local_mirror(tmp_path, serve):
    mirror = _mirror(tmp_path / "mirror")
    manifest = _manifest(mirror, tmp_path / "catalog")
    (mirror / "val2017/000000000003.jpg").unlink()
    base, _ = serve(mirror)
    over_http = fetch.fetch_dataset(manifest, tmp_path / "a", source=base)
    assert over_http.failed == [f"val2017/000000000003.jpg: {base}/val2017/000000000003.jpg answered HTTP 404 Not Found"]
    local = fetch.fetch_dataset(manifest, tmp_path / "b", source=str(mirror))
    missing = mirror / "val2017/000000000003.jpg"
    assert local.failed == [f"val2017/000000000003.jpg: not in the mirror ({missing} does not exist)"]
    assert len(local.fetched) == 3 and not list((tmp_path / "b").rglob("*.part"))
    with pytest.raises(InputError, match="--from /nowhere: neither an http"):
        fetch.fetch_dataset(manifest, tmp_path / "c", source="/nowhere")


def test_the_shipped_catalog_matches_its_annotations():
    """Every image of every shipped annotation JSON has one manifest entry: its official COCO file name
    under its split, the record's coco_url, a SHA-256; the shipped JSONs have the manifest's hashes."""
    for name in fetch.DATASETS:
        manifest = fetch.load_manifest(name)
        by_path = {f.path: f for f in manifest.images}
        assert len(by_path) == len(manifest.images)
        listed = set()
        for entry in manifest.annotations:
            shipped = manifest.catalog_dir / entry.path
            assert fetch.sha256_of(shipped) == entry.sha256 and shipped.stat().st_size == entry.size
            for record in json.loads(shipped.read_text())["images"]:
                split = record["coco_url"].split("/")[-2]
                image = by_path[f"{split}/{record['file_name']}"]
                assert image.url == record["coco_url"] == f"http://images.cocodataset.org/{image.path}"
                assert len(image.sha256) == 64 and image.size > 1000
                listed.add(image.path)
        assert listed == set(by_path), name
    assert len(fetch.load_manifest("tiny-coco").images) == 50
    assert len(fetch.load_manifest("coco-mini").images) == 158


def test_missing_real_data_names_the_fetch_command(tmp_path):
    message = fetch.missing_data_message("data/coco_mini/annotations/instances_train2017.json", "ann")
    assert message.startswith("ann: data/coco_mini/annotations/instances_train2017.json is not there: run "
                              "`lsnet data fetch coco-mini`")
    assert fetch.dataset_of(tmp_path / "data" / "tiny_coco" / "train2017") == "tiny-coco"
    assert fetch.dataset_of("data/other/x.json") is None
    with pytest.raises(InputError, match=r"data/tiny_coco is not there: run `lsnet data fetch tiny-coco`"):
        fetch.require_dataset_path(tmp_path / "data" / "tiny_coco")
    with pytest.raises(InputError, match="does not exist"):
        fetch.require_dataset_path(tmp_path / "elsewhere")


def test_the_real_tiny_coco_over_http_from_a_copy(tmp_path, serve, tiny_coco_dir):
    """The shipped tiny-coco manifest against a server on 127.0.0.1 that serves a copy of the real data."""
    base, server = serve(tiny_coco_dir)
    report = fetch.fetch_dataset(fetch.load_manifest("tiny-coco"), tmp_path / "tiny_coco", source=base)
    assert report.ok and len(report.fetched) == 52
    assert len(server.requests) == 50  # the annotations come from the repository
    _same_tree(tiny_coco_dir, tmp_path / "tiny_coco")


def test_demo_on_real_data_that_is_not_there_says_which_fetch_to_run(tmp_path, monkeypatch, capsys):
    from pipelines import demo
    from pipelines.cli import main

    monkeypatch.setattr(demo, "TINY_COCO", tmp_path / "data" / "tiny_coco")
    assert main(["demo", "--dataset", "tiny_coco", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    expected = (f"lsnet demo: error: --dataset tiny_coco: {tmp_path / 'data' / 'tiny_coco'} is not there: "
                "run `lsnet data fetch tiny-coco` (downloads it into data/tiny_coco; `--from DIR` copies it "
                "from a local mirror)")
    assert err == [expected]
    assert not (tmp_path / "out" / "runs").exists()  # refused before any work (no Ray was started)


def test_an_ablation_scale_on_real_data_that_is_not_there_says_which_fetch_to_run(tmp_path, monkeypatch, capsys):
    from lsnet.config import ConfigError
    from pipelines.ablations import data
    from pipelines.ablations.spec import load_ablation_spec
    from pipelines.cli import main

    spec = load_ablation_spec("table2")
    scale = spec.scale("small")
    assert scale.data.ann == "data/coco_mini/annotations/instances_train2017.json"
    monkeypatch.setattr(data, "REPO_ROOT", tmp_path)  # a clone without data/
    message = ("table2: data.ann: data/coco_mini/annotations/instances_train2017.json is not there: run "
               "`lsnet data fetch coco-mini`")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}"):
        data.prepare_dataset(spec, scale, tmp_path / "prepared")
    # the command checks every table's data before the first one runs (no store, no output written)
    out = tmp_path / "ablations"
    assert main(["ablation", "run", "table3", "table2", "--scale", "small", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"lsnet ablation run: error: {message.replace('table2', 'table3')}")
    assert not out.exists()
    (tmp_path / "data" / "coco_mini" / "annotations").mkdir(parents=True)  # a fetch that stopped early
    (tmp_path / scale.data.ann).write_text("{}")
    (tmp_path / scale.data.val_ann).write_text("{}")
    with pytest.raises(ConfigError, match=r"^table2: data.images: data/coco_mini/train2017 is not there"):
        data.check_data_present(spec, scale)


#: Files that still cite ../shared or DESIGN.md because other branches rewrite them at the time of writing
#: (issue 19): whoever merges those branches points them at docs/design.md / tests/data and empties this.
PENDING_ELSEWHERE: set[str] = set()
STALE = re.compile(r"\.\./shared|shared/(golden|data|schemas|DESIGN)|\bDESIGN(\.md)?\s*§")


def test_no_product_file_refers_to_the_developers_shared_folder():
    """A user's clone has no ../shared: code, specs, configs and docs must not point there, nor to its
    DESIGN.md (its facts are in docs/design.md). Tests may use ../shared only as a fetch source."""
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    offenders = []
    for rel in tracked.stdout.splitlines():
        if rel.startswith(("tests/", "results/")) or rel in PENDING_ELSEWHERE or not (REPO_ROOT / rel).is_file():
            continue
        try:
            text = (REPO_ROOT / rel).read_text()
        except UnicodeDecodeError:
            continue
        offenders += [f"{rel}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1) if STALE.search(line)]
    assert not offenders, offenders
