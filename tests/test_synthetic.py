"""The synthetic COCO generator: deterministic, valid COCO, concave/multi-part shapes, keypoints."""
from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from lsnet.data.synthetic import CATEGORIES, write_synthetic_coco


def _digest(root) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return write_synthetic_coco(tmp_path_factory.mktemp("synth"), num_images=10, image_size=(160, 192), seed=3)


def test_deterministic_and_prefix_stable(tmp_path, synth):
    again = write_synthetic_coco(tmp_path / "a", num_images=10, image_size=(160, 192), seed=3)
    assert _digest(again.root) == _digest(synth.root)
    # Image i depends only on (seed, i): a shorter run reproduces the first images exactly.
    short = write_synthetic_coco(tmp_path / "b", num_images=3, image_size=(160, 192), seed=3)
    for p in sorted(short.image_dir.iterdir()):
        assert p.read_bytes() == (synth.image_dir / p.name).read_bytes()
    other = write_synthetic_coco(tmp_path / "c", num_images=3, image_size=(160, 192), seed=4)
    assert _digest(other.image_dir) != _digest(short.image_dir)


def test_valid_coco_with_noncontiguous_ids(synth):
    coco = COCO(str(synth.instances_json))
    ids = sorted(coco.getCatIds())
    assert ids == [c["id"] for c in CATEGORIES]
    assert ids != list(range(1, len(ids) + 1))  # not contiguous: exercises id -> label mapping
    assert len(coco.getImgIds()) == 10
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        x, y, w, h = ann["bbox"]
        assert w > 0 and h > 0 and x >= 0 and y >= 0
        assert x + w <= img["width"] and y + h <= img["height"]
        assert ann["area"] > 0 and ann["iscrowd"] == 0
        assert all(len(p) >= 6 and len(p) % 2 == 0 for p in ann["segmentation"])


def test_concave_and_multipart_present(tmp_path):
    ds = write_synthetic_coco(tmp_path, num_images=24, image_size=(128, 128), seed=0)
    anns = json.loads(ds.instances_json.read_text())["annotations"]
    names = {c["id"]: c["name"] for c in CATEGORIES}
    seen = {names[a["category_id"]] for a in anns}
    assert {"c_shape", "u_shape", "l_shape", "twin", "person"} <= seen
    for a in anns:
        if names[a["category_id"]] == "twin":
            assert len(a["segmentation"]) == 2  # two separate parts in one annotation
        if names[a["category_id"]] in ("c_shape", "u_shape", "l_shape"):
            # concave: the polygon's area is clearly below its convex hull's area
            pts = np.array(a["segmentation"][0]).reshape(-1, 2)
            hull_area = _convex_hull_area(pts)
            assert _shoelace(pts) < 0.92 * hull_area


def _shoelace(p):
    x, y = p[:, 0], p[:, 1]
    return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


def _convex_hull_area(p):
    pts = sorted(map(tuple, p))

    def half(points):
        out = []
        for q in points:
            while len(out) >= 2 and np.cross(np.subtract(out[-1], out[-2]), np.subtract(q, out[-2])) <= 0:
                out.pop()
            out.append(q)
        return out

    hull = half(pts)[:-1] + half(pts[::-1])[:-1]
    return _shoelace(np.array(hull))


def test_polygons_are_the_rendered_outline(synth):
    """Pixels inside each polygon have the object's colour; this is what 'easy to learn' relies on."""
    coco = COCO(str(synth.instances_json))
    colours = {c["id"]: np.array(c["color"]) for c in CATEGORIES}
    checked = 0
    for ann in coco.dataset["annotations"]:
        img = coco.imgs[ann["image_id"]]
        pixels = np.asarray(Image.open(synth.image_dir / img["file_name"]).convert("RGB")).astype(float)
        rle = mask_utils.merge(mask_utils.frPyObjects(ann["segmentation"], img["height"], img["width"]))
        mask = mask_utils.decode(rle).astype(bool)
        close = np.abs(pixels - colours[ann["category_id"]]).max(-1) < 45
        x, y, w, h = (round(v) for v in ann["bbox"])
        box = np.zeros_like(mask)
        box[y:y + h, x:x + w] = True
        inter = (mask & close & box).sum()
        union = ((mask | close) & box).sum()
        assert inter / union > 0.97, (ann["id"], inter / union)
        checked += 1
    assert checked >= 20


def test_person_keypoints(synth):
    kp = json.loads(synth.keypoints_json.read_text())
    inst = {a["id"]: a for a in json.loads(synth.instances_json.read_text())["annotations"]}
    assert kp["categories"][0]["id"] == 1 and len(kp["categories"][0]["keypoints"]) == 17
    assert len(kp["categories"][0]["skeleton"]) == 19
    assert kp["annotations"], "expected persons in 10 images"
    all_vis = []
    for a in kp["annotations"]:
        assert inst[a["id"]]["category_id"] == 1 and inst[a["id"]]["bbox"] == a["bbox"]
        k = np.array(a["keypoints"], dtype=float).reshape(17, 3)
        assert a["num_keypoints"] == int((k[:, 2] > 0).sum()) >= 1
        assert (k[k[:, 2] == 0, :2] == 0).all()  # COCO: unlabelled = 0,0,0
        x, y, w, h = a["bbox"]
        lab = k[k[:, 2] > 0]
        assert (lab[:, 0] >= x - 1).all() and (lab[:, 0] <= x + w + 1).all()
        assert (lab[:, 1] >= y - 1).all() and (lab[:, 1] <= y + h + 1).all()
        # facing the camera: the person's left shoulder is on the image right
        if k[5, 2] and k[6, 2]:
            assert k[5, 0] > k[6, 0]
        all_vis += k[:, 2].tolist()
    assert {0, 1, 2} <= {int(v) for v in all_vis}


def test_cli(tmp_path):
    from pipelines.cli import main

    assert main(["synth", str(tmp_path), "--num-images", "2", "--image-size", "64", "96", "--seed", "1"]) == 0
    data = json.loads((tmp_path / "annotations" / "instances_train.json").read_text())
    assert [(i["height"], i["width"]) for i in data["images"]] == [(64, 96), (64, 96)]


def test_second_split_never_overwrites_the_first(tmp_path, capsys):
    """Before: `synth D --num-images 24` then `synth D --num-images 8 --split val` reused ids 1000..1007
    and overwrote 8 training images."""
    from pipelines.cli import main

    assert main(["synth", str(tmp_path), "--num-images", "4", "--image-size", "32", "32"]) == 0
    train_bytes = {p.name: p.read_bytes() for p in (tmp_path / "images").glob("*.jpg")}
    assert main(["synth", str(tmp_path), "--num-images", "2", "--image-size", "32", "32", "--split", "val",
                 "--seed", "1"]) == 0
    val = json.loads((tmp_path / "annotations" / "instances_val.json").read_text())
    assert [im["id"] for im in val["images"]] == [1004, 1005]  # after train's 1000..1003
    assert all((tmp_path / "images" / name).read_bytes() == data for name, data in train_bytes.items())
    # an explicit --first-id that overlaps train: error, nothing written
    assert main(["synth", str(tmp_path), "--num-images", "2", "--split", "test", "--first-id", "1002"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lsnet synth: error: image ids 1002..1003 of split 'test' are already used by ")
    assert err.endswith("instances_train.json: choose another --first-id (or leave it unset)")
    assert not (tmp_path / "annotations" / "instances_test.json").exists()
    # the same split again: refused without --overwrite, replaced with it
    assert main(["synth", str(tmp_path), "--num-images", "4", "--image-size", "32", "32"]) == 2
    assert "exists (6 file(s) of split 'train' would be replaced): pass --overwrite" in capsys.readouterr().err
    assert main(["synth", str(tmp_path), "--num-images", "4", "--image-size", "40", "40", "--overwrite"]) == 0
    assert {p.name for p in (tmp_path / "images").glob("*.jpg")} == {f"{i:012d}.jpg" for i in range(1000, 1006)}
    assert (tmp_path / "images" / "000000001000.jpg").read_bytes() != train_bytes["000000001000.jpg"]
