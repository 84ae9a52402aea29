"""``lsnet test``: COCO metrics of a checkpoint on a dataset in one command (mmdetection's ``tools/test.py``).

    lsnet test results/runs/x/model_best.pt --shards data/coco/shards/val2017 [--out preds.json]
    lsnet test model.pt --ann instances_val2017.json --images val2017/ [--tta none|flip|ms|flip+ms|atss]

- The model, class ids/names and the test resize come from the checkpoint (every checkpoint of
  ``lsnet train`` stores them; ``--config`` / ``--short-side`` / ``--max-size`` override, as for
  ``lsnet predict``).
- ``--shards``: a directory written by ``lsnet preprocess`` (its ``gt.json`` is the ground truth);
  ``--ann`` + ``--images``: a COCO JSON and its image folder, read directly.
- ``--tta``: default ``config`` = the model config's ``model.test`` (single scale unless it sets
  ``flip`` / ``scales``); ``atss`` = the paper's multi-scale test (ATSS's 12 sizes as factors of the
  test size, flip, ATSS's scale ranges and box voting, :mod:`lsnet.modeling.inference`).
- Prints the COCO metrics and the per-category AP table; ``--out`` writes the COCO results JSON and
  ``--metrics-out`` the metrics + table as JSON. A progress line goes to stderr (readable in logs).
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from lsnet.errors import InputError
from lsnet.progress import Progress
from lsnet.structures import Batch

#: --tta choices -> keyword arguments of lsnet.modeling.inference.predict_with_tta ("config": none, i.e. the
#: model config's model.test; "atss" is filled in from the test size by tta_arguments)
TTA = {"config": {}, "none": {"flip": False, "scales": (1.0,)}, "flip": {"flip": True, "scales": (1.0,)},
       "ms": {"flip": False, "scales": (0.8, 1.0, 1.2)}, "flip+ms": {"flip": True, "scales": (0.8, 1.0, 1.2)},
       "atss": None}


def tta_arguments(tta: str, short_side: int) -> dict:
    """The ``predict_with_tta`` keyword arguments of a ``--tta`` choice at test size ``short_side``."""
    from lsnet.modeling.inference import ATSS_SCALE_RANGES, ATSS_VOTE_MAX_DETS, atss_test_scales

    if tta == "atss":
        return {"flip": True, "scales": atss_test_scales(short_side), "scale_ranges": ATSS_SCALE_RANGES,
                "merge": "vote", "vote_max_dets": ATSS_VOTE_MAX_DETS}
    return dict(TTA[tta])


def _shard_batches(shards: str, loaded, batch_size: int) -> tuple[Iterator[Batch], int, str | Path, list[int]]:
    from torch.utils.data import DataLoader

    from lsnet.data.shards import ShardDataset, collate_batch

    ds = ShardDataset(shards, task=loaded.task, num_points=loaded.model.cfg.num_points,
                      pose_box=loaded.model.cfg.pose_box, train=False, scale_range=None,
                      max_size=loaded.max_size, test_short_side=loaded.short_side, verify="size")
    if list(ds.category_ids) != list(loaded.category_ids):
        raise InputError(f"--shards {shards}: category ids {list(ds.category_ids)[:10]} differ from the "
                         f"checkpoint's {list(loaded.category_ids)[:10]}")
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, collate_fn=collate_batch)
    return iter(loader), len(ds), ds.gt_path, []


def _file_batches(ann: str, images: str, loaded, batch_size: int):
    from lsnet.predict import load_image, prepare_images

    try:
        data = json.loads(Path(ann).read_text())
    except FileNotFoundError:
        raise InputError(f"--ann {ann} does not exist") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise InputError(f"--ann {ann} is not valid JSON (truncated?): {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise InputError(f"--ann {ann}: not a COCO annotation file (no 'images' list)")
    root = Path(images)
    if not root.is_dir():
        raise InputError(f"--images {images}: the image folder does not exist")
    records = [im for im in data["images"] if isinstance(im, dict) and "id" in im and "file_name" in im]

    def batches():
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            pixels = [load_image(root / im["file_name"]) for im in chunk]
            tensor, metas = prepare_images(pixels, [int(im["id"]) for im in chunk], loaded.short_side,
                                           loaded.max_size)
            yield Batch(tensor, [None] * len(chunk), metas)

    return batches(), len(records), data, []


def evaluate_checkpoint(checkpoint: str | Path, *, shards: str | None = None, ann: str | None = None,
                    images: str | None = None, config: str | None = None, tta: str = "config",
                    batch_size: int = 2, device: str | None = None, short_side: int | None = None,
                    max_size: int | None = None, progress: bool = True):
    """Evaluate ``checkpoint`` on a dataset; returns ``(EvalResult, LoadedModel)``."""
    from lsnet.engine import evaluate_detailed
    from lsnet.modeling.inference import predict_with_tta
    from lsnet.predict import load_model

    if (shards is None) == (ann is None) or (ann is not None and images is None):
        raise InputError("give either --shards DIR or --ann JSON --images DIR")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    loaded = load_model(checkpoint, config, device, short_side, max_size)
    if shards is not None:
        batches, total, gt, _ = _shard_batches(shards, loaded, batch_size)
    else:
        batches, total, gt, _ = _file_batches(ann, images, loaded, batch_size)
    if total == 0:
        raise InputError(f"{shards or ann}: no images to test on")
    tta_kwargs = tta_arguments(tta, loaded.short_side)
    bar = Progress(total, "test", "images", enabled=progress)

    def predict(model, batch_images, metas):
        dets = predict_with_tta(model, batch_images, metas, **tta_kwargs)
        bar.update(len(metas))
        return dets

    with bar:
        result = evaluate_detailed(loaded.model, batches, gt, loaded.category_ids, loaded.task, device=device,
                                   predict_fn=predict)
    return result, loaded


