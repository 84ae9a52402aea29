"""``lsnet demo`` (what ``make demo`` runs): the whole pipeline on embedded defaults, on this machine.

1. writes a seeded synthetic COCO-format dataset (``lsnet synth``): a training and a held-out
   validation split — or, with ``--dataset tiny_coco``, uses the 50 real images of ``data/tiny_coco``
   (``lsnet data fetch tiny-coco``; train and evaluate on the same images: there is no val split);
2. preprocesses both to Arrow shards with Ray Data on a local Ray (``lsnet preprocess``);
3. trains a tiny LSNet (``configs/tiny_<task>.yaml``: ResNet-18, 64 channels, 128-px images) with
   2 Ray Train workers on the CPU (``lsnet train``), evaluating COCO metrics every few epochs; by
   default with the authors' network (``--head reference``: their head, GroupNorm FPN, centre vector
   and reference cross-IOU loss, :data:`HEAD_OVERRIDES`), or with the compact head (``--head compact``);
4. logs everything to the demo's own MLflow store (``<out>/mlflow.db``: the demo never mixes its runs
   into the checkout's shared ``results/mlflow.db``, and deleting ``<out>`` removes all of it) and writes
   prediction overlays;
5. prints where the run, the metrics and the pictures are, and the command that opens the MLflow UI.

Re-running reuses the generated data and shards (preprocessing is idempotent) and starts a new run.
"""
from __future__ import annotations

import datetime as _dt
import os
import sys
import time
from pathlib import Path

from lsnet.errors import InputError
from pipelines.paths import REPO_ROOT

TINY_COCO = REPO_ROOT / "data" / "tiny_coco"  # where `lsnet data fetch tiny-coco` puts it
HEADLINE = {"bbox": ("bbox_AP", "bbox_AP50", "bbox_AP75", "bbox_APs", "bbox_APm", "bbox_APl"),
            "segm": ("bbox_AP", "segm_AP", "segm_AP50", "segm_AP75", "segm_APs", "segm_APm", "segm_APl"),
            "pose": ("kp_AP", "kp_AP50", "kp_AP75", "kp_APm", "kp_APl")}


#: what ``--head`` adds to the tiny config (before the user's ``--set``): the authors' network as the
#: paper-reproduction configs build it (configs/_base_/coco_r50.yaml), or the compact head as it is
HEAD_OVERRIDES = {
    "reference": ["model.head=reference", "model.fpn_norm=gn", "model.fpn_extra_source=c5",
                  "model.fpn_relu_before_p7=false", "model.center_vector=true",
                  "model.loss.vector_loss_form=reference"],
    "compact": [],
}


def _say(message: str) -> None:
    print(f"[demo] {message}", flush=True)


def tiny_coco_annotations(task: str) -> Path:
    """The annotation JSON of ``data/tiny_coco`` for ``task``; a missing dataset is one line saying which
    ``lsnet data fetch`` to run (checked before any Ray starts)."""
    ann = TINY_COCO / "annotations" / f"{'person_keypoints' if task == 'pose' else 'instances'}_train2017.json"
    if not ann.exists() or not (TINY_COCO / "train2017").is_dir():
        from lsnet.data.fetch import fetch_instruction

        raise InputError(f"--dataset tiny_coco: {TINY_COCO} is not there: {fetch_instruction('tiny-coco')}")
    return ann


def prepare_data(out: Path, dataset: str, task: str, num_train: int, num_val: int, image_size: int,
                 num_cpus: int, executor: str = "ray") -> tuple[Path, Path]:
    """Generate (or locate) the dataset and preprocess it to shards; returns (train, val) shard dirs.
    ``executor="local"``: without Ray (the same shards; tests/test_readme.py makes a small demo so)."""
    from lsnet.data.synthetic import write_synthetic_coco
    from pipelines.preprocess import preprocess

    kind = "person_keypoints" if task == "pose" else "instances"
    contours = (18, 36, 72)  # every count of paper §4.4: configs/spaces/segm_points_alpha.yaml searches them
    if dataset == "synthetic":
        splits = {}
        for split, count, seed, first_id in (("train", num_train, 0, 1000), ("val", num_val, 1, 100000)):
            root = out / "data" / f"synthetic_{split}"
            ann = root / "annotations" / f"{kind}_{split}.json"
            if not ann.exists() or len(list((root / "images").glob("*.jpg"))) != count:
                _say(f"writing {count} synthetic {split} images ({image_size} px) to {root}")
                write_synthetic_coco(root, num_images=count, image_size=(image_size, image_size), seed=seed,
                                     split=split, first_image_id=first_id, size_jitter=0.15, overwrite=True)
            splits[split] = (ann, root / "images")
    else:
        ann = tiny_coco_annotations(task)
        splits = {"train": (ann, TINY_COCO / "train2017"), "val": (ann, TINY_COCO / "train2017")}
    shard_dirs = []
    for split in ("train", "val"):
        ann, images = splits[split]
        shard_dir = out / "shards" / f"{dataset}_{kind}_{split}_{image_size}"
        _say(f"preprocessing {ann.name} with Ray Data -> {shard_dir}")
        preprocess(ann, images, shard_dir, max_size=image_size, contour_points=contours, num_cpus=num_cpus,
                   verbose=False, executor=executor)
        shard_dirs.append(shard_dir)
    return shard_dirs[0], shard_dirs[1]


def run_demo(out: Path, dataset: str = "synthetic", task: str = "bbox", num_train: int = 64, num_val: int = 16,
             image_size: int = 128, epochs: int = 32, num_workers: int = 2, overrides: list[str] | None = None,
             verbose: bool = False, head: str = "reference") -> dict:
    import ray

    from lsnet.data.shards import load_manifest
    from pipelines.config import load_config
    from pipelines.tracking.store import ui_command
    from pipelines.train.driver import run_training

    if head not in HEAD_OVERRIDES:
        raise InputError(f"--head must be one of {sorted(HEAD_OVERRIDES)}, got {head!r}")
    started = time.perf_counter()
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    num_cpus = os.cpu_count() or 2
    os.environ.pop("MLFLOW_TRACKING_URI", None)  # the demo always logs to its own local store (tracking.uri below)
    if dataset == "tiny_coco":
        tiny_coco_annotations(task)
    if not ray.is_initialized():
        from pipelines.ray_local import start_ray

        _say(f"starting a local Ray with {num_cpus} CPUs")
        # with the dashboard, so the State API that Ray Train's placement-group cleaner polls is there
        start_ray(num_cpus=num_cpus)
    train_shards, val_shards = prepare_data(out, dataset, task, num_train, num_val, image_size, num_cpus)
    num_classes = len(load_manifest(train_shards)["categories"])
    lr_step = max(1, round(epochs * 0.75))
    cfg = load_config(REPO_ROOT / "configs" / f"tiny_{task}.yaml", [
        f"data.train_shards={train_shards}", f"data.val_shards={val_shards}",
        f"data.scale_range=[{image_size}, {image_size}]", f"data.max_size={image_size}",
        f"data.test_scale={image_size}", f"model.num_classes={num_classes}",
        f"train.epochs={epochs}", f"train.lr_steps=[{lr_step}]", f"train.eval_every={max(1, epochs // 4)}",
        f"run.num_workers={num_workers}", f"run.storage_path={out / 'runs'}", "run.resources_per_worker={CPU: 1}",
        f"tracking.uri=sqlite:///{out / 'mlflow.db'}",
        *HEAD_OVERRIDES[head], *(overrides or []),
    ])
    name = f"demo-{dataset}-{task}-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%d-%H%M%S')}"
    _say(f"training {cfg.model.backbone} LSNet ({task}, {cfg.model.head} head) with {cfg.run.num_workers} Ray Train workers on CPU, "
         f"{cfg.train.epochs} epochs; one summary line per epoch follows")
    outcome = run_training(cfg, run_name=name, verbose=False)
    elapsed = time.perf_counter() - started

    metrics = outcome.metrics
    overlays = sorted((outcome.run_dir / "overlays").glob("epoch_*"))
    print()
    _say(f"done in {elapsed / 60:.1f} min")
    shown = [k for k in HEADLINE[task] if k in metrics]
    _say("COCO metrics on the validation images after the last epoch: "
         + ", ".join(f"{k} {metrics[k]:.3f}" for k in shown))
    _say(f"run directory:     {outcome.run_dir}")
    _say(f"final checkpoint:  {outcome.run_dir / 'model_final.pt'}")
    if overlays:
        _say(f"prediction images: {overlays[-1]}")
    if outcome.tracking_uri:
        _say(f"MLflow run {outcome.mlflow_run_id} (experiment '{cfg.tracking.experiment}')")
        mlflow_bin = Path(sys.executable).with_name("mlflow")
        _say("open the MLflow UI (then browse to http://127.0.0.1:5000):")
        print(f"    {ui_command(outcome.tracking_uri, str(mlflow_bin) if mlflow_bin.exists() else 'mlflow')}")
    return {"run_dir": str(outcome.run_dir), "metrics": metrics, "seconds": elapsed,
            "overlays": str(overlays[-1]) if overlays else None, "tracking_uri": outcome.tracking_uri,
            "mlflow_run_id": outcome.mlflow_run_id}


