"""``lsnet predict``: run a trained LSNet on image files; COCO results JSON + one overlay PNG per image.

    lsnet predict img1.jpg img2.png --checkpoint results/runs/x/best.pt --out preds/ \
        [--config configs/bbox_r50_1x.yaml] [--score-thr 0.3] [--flip-tta]

- Model config: the ``model:`` section of an experiment YAML, or a model-only YAML (the whole
  mapping), read with :func:`lsnet.config.load_yaml` (``_base_`` works). Without ``--config`` the
  ``model_config`` stored in the checkpoint's ``extra`` is used. Pretrained backbone weights are never
  fetched here: the checkpoint has all the weights.
- Test resize: shorter side ``data.test_scale``, longer side at most ``data.max_size`` from the same
  YAML, else from the checkpoint's ``data_config`` (every checkpoint of ``lsnet train`` stores it),
  else 800/1333 with a warning (paper: [800, 1333]); ``--short-side`` / ``--max-size`` override.
- Category ids and names come from the checkpoint's ``extra`` (``category_ids``, ``class_names``,
  written by the training pipeline through :func:`lsnet.engine.checkpoint_state`).
- Outputs in ``--out``: ``predictions.json`` (COCO results, original pixels), ``images.json``
  (``{"images": [{id, file_name, height, width}], "categories": [{id, name}]}``: which id is which
  file), and ``<stem>.png`` overlays. Image ids are the file stems when every stem is a number
  (COCO style ``000000397133.jpg``), else 1..n in the order given.
"""
from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import mmcv
import numpy as np
import torch

from lsnet.config import ConfigError, from_dict, load_yaml
from lsnet.data.augment import AugmentConfig, augment_sample, collate_batch
from lsnet.engine import load_checkpoint
from lsnet.errors import InputError
from lsnet.evaluation import detections_to_coco, rescale_detections
from lsnet.progress import Progress
from lsnet.structures import ImageMeta, LandmarkTargets
from lsnet.visualize import draw_detections, save_png

DEFAULT_SHORT_SIDE = 800
DEFAULT_MAX_SIZE = 1333


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def load_image(path: str | Path) -> np.ndarray:
    """An image file as (H, W, 3) RGB uint8; errors name the file."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(f"image {path} does not exist") from None
    except IsADirectoryError:
        raise InputError(f"image {path} is a directory, not an image file") from None
    image = None
    if data:
        try:
            image = mmcv.imfrombytes(data, flag="color", channel_order="rgb")
        except cv2.error:  # mmcv converts the colour of a failed (empty) decode
            image = None
    if image is None:
        raise InputError(f"image {path} cannot be decoded (empty, corrupt or not an image)")
    return np.ascontiguousarray(image)


def prepare_images(images: Sequence[np.ndarray], image_ids: Sequence[int], short_side: int,
                   max_size: int) -> tuple[torch.Tensor, list[ImageMeta]]:
    """RGB uint8 (H, W, 3) images -> one normalised, zero-padded batch and their metas.

    Exactly the test pipeline of the shard reader (:func:`lsnet.data.augment.augment_sample` with
    ``train=False``, then :func:`lsnet.data.augment.collate_batch`), so a model sees at prediction
    time the same resize and normalisation it was evaluated with.
    """
    cfg = AugmentConfig(scale_range=None, max_size=max_size, test_short_side=short_side)
    items = []
    for image, image_id in zip(images, image_ids):
        h, w = image.shape[:2]
        tensor = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
        meta = ImageMeta(image_id=int(image_id), orig_size=(h, w), size=(h, w), scale=(1.0, 1.0))
        items.append(augment_sample(tensor, LandmarkTargets.empty(1), meta, cfg, task="bbox", train=False))
    batch = collate_batch(items)
    return batch.images, batch.metas


def image_ids_for(paths: Sequence[str | Path]) -> list[int]:
    """File stems as ids when all are distinct numbers (COCO file names), else 1..n."""
    stems = [Path(p).stem for p in paths]
    if all(s.isdigit() for s in stems) and len(set(map(int, stems))) == len(stems):
        return [int(s) for s in stems]
    return list(range(1, len(paths) + 1))


# --------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoadedModel:
    model: torch.nn.Module
    task: str
    category_ids: list[int]
    class_names: list[str]
    short_side: int
    max_size: int
    #: where the test resize came from: "arguments", "config", "checkpoint" or "default".
    resize_source: str = "default"
    #: the training run's eval.flip_test (lsnet test uses it unless --tta says otherwise)
    flip_test: bool = False


def _model_section(config: dict) -> dict:
    return dict(config["model"]) if isinstance(config.get("model"), dict) else dict(config)


def load_model(checkpoint: str | Path, config: str | Path | None = None, device: str | torch.device = "cpu",
               short_side: int | None = None, max_size: int | None = None) -> LoadedModel:
    """Build the model from ``config`` (or the checkpoint's stored config) and load the weights."""
    from lsnet.modeling import ModelConfig, build_model

    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    extra: dict[str, Any] = ckpt.get("extra") or {}
    data_section: dict = {}
    stored_data = extra.get("data_config") if isinstance(extra.get("data_config"), dict) else {}
    if config is not None:
        raw = load_yaml(config)
        section = _model_section(raw)
        # a model-only YAML says nothing about the resize: keep the checkpoint's test-time settings
        data_section = raw["data"] if isinstance(raw.get("data"), dict) else stored_data
        source = str(config)
    elif isinstance(extra.get("model_config"), dict):
        section = dict(extra["model_config"])
        data_section = stored_data
        source = f"{checkpoint} (stored model_config)"
    else:
        raise InputError(f"checkpoint {checkpoint} stores no model_config: pass --config CONFIG.yaml")
    section["pretrained"] = None  # every weight comes from the checkpoint; never download
    try:
        model_cfg = from_dict(ModelConfig, section, prefix="model")
    except (ConfigError, ValueError) as err:
        raise ConfigError(f"{source}: {err}") from None
    model = build_model(model_cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        raise InputError(f"checkpoint {checkpoint} does not fit the model of {source} "
                         f"(task {model_cfg.task}, {model_cfg.num_classes} classes, {model_cfg.backbone}): "
                         f"{str(err).splitlines()[0]}") from None
    model.to(device).eval()

    num_classes = model_cfg.num_classes
    category_ids = [int(c) for c in extra.get("category_ids", range(1, num_classes + 1))]
    class_names = [str(n) for n in extra.get("class_names", [str(c) for c in category_ids])]
    if len(category_ids) != num_classes or len(class_names) != num_classes:
        raise InputError(f"checkpoint {checkpoint}: {len(category_ids)} category ids / {len(class_names)} "
                         f"class names for a model with {num_classes} classes")
    if short_side and max_size:
        resize_source = "arguments"
    elif "test_scale" in data_section:
        resize_source = "config" if data_section is not stored_data else "checkpoint"
    else:
        resize_source = "default"
    return LoadedModel(
        model=model, task=model_cfg.task, category_ids=category_ids, class_names=class_names,
        short_side=int(short_side or data_section.get("test_scale", DEFAULT_SHORT_SIDE)),
        max_size=int(max_size or data_section.get("max_size", DEFAULT_MAX_SIZE)),
        resize_source=resize_source, flip_test=bool(data_section.get("flip_test", False)),
    )


def describe_resize(loaded: LoadedModel) -> str:
    """One line saying which test resize is used and where it came from (a default is a warning)."""
    line = f"test resize: shorter side {loaded.short_side}, longer side <= {loaded.max_size} ({loaded.resize_source})"
    if loaded.resize_source == "default":
        line = ("warning: " + line + " -- the checkpoint stores no test-time data settings; pass --config or "
                "--short-side/--max-size if the model was trained at another scale")
    return line


# --------------------------------------------------------------------------------------------------
# Prediction
# --------------------------------------------------------------------------------------------------


def predict_files(
    loaded: LoadedModel,
    paths: Sequence[str | Path],
    out_dir: str | Path,
    score_thr: float = 0.3,
    flip_tta: bool = False,
    batch_size: int = 1,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> list[dict]:
    """Predict every image, write predictions.json, images.json and overlays; return the records.

    ``score_thr`` is the overlay threshold; the JSON keeps every detection the model returns (its
    ``test.score_thr``, 0.05 by default, as for COCO evaluation). A ``score_thr`` below the model's
    own threshold lowers the model's threshold to it, so those detections exist.
    """
    from lsnet.modeling.inference import predict_with_tta

    paths = [Path(p) for p in paths]
    if not paths:
        raise InputError("no image paths given")
    images = [load_image(p) for p in paths]  # fail early, naming the bad file, before any compute
    image_ids = image_ids_for(paths)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = loaded.model
    model.cfg.test.score_thr = min(model.cfg.test.score_thr, score_thr)

    records: list[dict] = []
    used_names: set[str] = set()
    bar = Progress(len(paths), "predict", "images", enabled=progress)
    for start in range(0, len(paths), batch_size):
        chunk = slice(start, start + batch_size)
        batch, metas = prepare_images(images[chunk], image_ids[chunk], loaded.short_side, loaded.max_size)
        batch = batch.to(device)
        with torch.no_grad():
            if flip_tta:
                dets = predict_with_tta(model, batch, metas, flip=True)
            else:
                dets = model(batch, image_sizes=[m.size for m in metas])
        dets = [d.to("cpu") for d in dets]
        records += detections_to_coco(dets, metas, loaded.category_ids, loaded.task)
        for det, meta, image, path in zip(dets, metas, images[chunk], paths[chunk]):
            overlay = draw_detections(image, rescale_detections(det, meta), loaded.task, loaded.class_names,
                                      score_thr=score_thr)
            name = path.stem
            while name in used_names:
                name += "_"
            used_names.add(name)
            save_png(out_dir / f"{name}.png", overlay)
        bar.update(len(metas))
    bar.close()

    (out_dir / "predictions.json").write_text(json.dumps(records))
    index = {
        "images": [{"id": i, "file_name": str(p), "height": int(im.shape[0]), "width": int(im.shape[1])}
                   for i, p, im in zip(image_ids, paths, images)],
        "categories": [{"id": c, "name": n} for c, n in zip(loaded.category_ids, loaded.class_names)],
    }
    (out_dir / "images.json").write_text(json.dumps(index, indent=1))
    return records


