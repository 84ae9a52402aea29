"""``lsnet bench gpu`` (jobs/bench/gpu.yaml): the GPU path, measured and exercised end to end.

1. :func:`pipelines.bench.gpu_models.run` on one CUDA device: LSNet-R50 bbox and torchvision FCOS-R50
   at 800x1333, batch 2, AMP and channels-last on/off: training s/iter, peak memory, batch-1
   inference images/s (forward + post-processing).
2. A 1-GPU ``lsnet train`` smoke through Ray Train with NCCL (:func:`pipelines.train.driver.run_training`,
   one worker, ``run.use_gpu=true``) on a few synthetic 800-px images: one epoch, evaluation on
   the same shards, checked to have run every step on a CUDA device.

Without CUDA the same code runs at the ``toy`` sizes of the spec on the CPU (smoke with gloo), so
``make test`` keeps it working; the output then says that GPU numbers need a GPU and checks nothing.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pipelines.bench.runner import BenchResult
from pipelines.paths import REPO_ROOT

NO_GPU_NOTE = ("NO CUDA DEVICE: this ran the same code at toy size on the CPU to keep it working; "
               "the GPU numbers (and the targets) need a GPU: run `lsnet bench gpu` on a machine with one")


def ray_train_smoke(config: str, num_images: int, image_size: int, use_gpu: bool, work_dir: Path,
                    overrides: list[str] | None = None) -> dict[str, Any]:
    """One epoch of ``lsnet train`` (Ray Train, 1 worker, NCCL on GPU / gloo on CPU) on ``num_images``
    synthetic ``image_size``-px images, evaluated on the same shards. Raises when anything fails or a
    step is missing; returns the row of the benchmark table."""
    import ray

    from pipelines.config import load_config
    from pipelines.synthetic import synthetic_shards
    from pipelines.train.driver import run_training

    shards, _ = synthetic_shards(work_dir, num_images, image_size, overwrite=False)
    batch = 2
    settings = [
        f"data.train_shards={shards}", f"data.val_shards={shards}", f"data.scale_range=[{image_size}, {image_size}]",
        f"data.max_size={image_size}", f"data.test_scale={image_size}", "data.val_batch_size=2",
        "data.loader_workers=0", "model.num_classes=8", "model.pretrained=null",  # synthetic: 8 classes; no download
        "train.epochs=1", "train.lr_steps=[]", "train.warmup_iters=1", f"train.batch_size={batch}",
        "train.eval_every=1", "train.log_every=1", "eval.num_overlays=0", "tracking.enabled=false",
        "run.num_workers=1", f"run.use_gpu={str(use_gpu).lower()}", "run.max_failures=0",
        "run.resources_per_worker={CPU: 1, GPU: 1}" if use_gpu else "run.resources_per_worker={CPU: 1}",
        f"run.storage_path={work_dir / 'runs'}", *(overrides or []),
    ]
    cfg = load_config(REPO_ROOT / config, settings)
    started_ray = not ray.is_initialized()
    if started_ray:  # a private local cluster, never one another process started on this machine
        import torch

        from pipelines.ray_local import init_local_ray

        init_local_ray(num_cpus=max(2, os.cpu_count() or 2), num_gpus=torch.cuda.device_count(),
                       include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        outcome = run_training(cfg, run_name="gpu-smoke", verbose=False)
    finally:
        if started_ray:
            ray.shutdown()
    epochs = [json.loads(line) for line in (outcome.run_dir / "epochs.jsonl").read_text().splitlines()]
    worker = json.loads((outcome.run_dir / "workers" / "rank0.json").read_text())
    steps = num_images // batch
    if outcome.metrics.get("global_step") != steps or not epochs:
        raise RuntimeError(f"gpu smoke: expected {steps} steps, the run reports {outcome.metrics}")
    if use_gpu and not str(worker["device"]).startswith("cuda"):
        raise RuntimeError(f"gpu smoke: the Ray Train worker ran on {worker['device']}, not on a CUDA device")
    last = epochs[-1]
    return {"model": f"lsnet train smoke ({Path(config).stem}, Ray Train, 1 worker)",
            "backend": "nccl" if use_gpu else "gloo", "device": worker["device"], "images": num_images,
            "image_px": image_size, "steps": int(outcome.metrics["global_step"]),
            "epoch_s": last["epoch_time_s"], "train_images_per_s": last["images_per_s"],
            "bbox_AP": last.get("bbox_AP"), "amp": "on" if use_gpu and cfg.train.amp else "off",
            "channels_last": "on" if use_gpu and cfg.train.channels_last else "off"}


def gpu(image_size: list[int] | None = None, batch_size: int = 2, warmup: int = 5, iters: int = 20,
        infer_warmup: int = 10, infer_iters: int = 50, backbone: str = "resnet50", settings: list | None = None,
        smoke: bool = True, smoke_config: str = "configs/bbox_r50_1x.yaml", smoke_images: int = 4,
        smoke_image_size: int = 800, toy: dict[str, Any] | None = None, train_target_s: float = 0.25,
        infer_target_fps: float = 25.0, force_cpu: bool = False) -> BenchResult:
    """Model measurements + the Ray Train smoke (module docstring). ``toy`` replaces any of these
    parameters when no CUDA device is available (or ``force_cpu``)."""
    import torch

    from pipelines.bench.gpu_models import DEFAULT_SETTINGS, run

    cuda = torch.cuda.is_available() and not force_cpu
    params = {"image_size": image_size or [800, 1333], "batch_size": batch_size, "warmup": warmup, "iters": iters,
              "infer_warmup": infer_warmup, "infer_iters": infer_iters, "backbone": backbone,
              "settings": settings or [list(s) for s in DEFAULT_SETTINGS], "smoke": smoke,
              "smoke_config": smoke_config, "smoke_images": smoke_images, "smoke_image_size": smoke_image_size}
    if not cuda and toy:
        unknown = set(toy) - set(params)
        if unknown:
            raise ValueError(f"bench gpu: unknown toy parameter(s) {sorted(unknown)}; known: {sorted(params)}")
        params.update(toy)
    if not cuda:
        print(f"bench gpu: {NO_GPU_NOTE}", flush=True)
    result = run(image_size=params["image_size"], batch_size=params["batch_size"], warmup=params["warmup"],
                 iters=params["iters"], infer_warmup=params["infer_warmup"], infer_iters=params["infer_iters"],
                 backbone=params["backbone"], settings=params["settings"], device="cuda" if cuda else "cpu")
    if cuda:
        torch.cuda.empty_cache()  # the Ray Train worker is another process on the same GPU
    if params["smoke"]:
        with tempfile.TemporaryDirectory(prefix="lsnet-bench-gpu-") as tmp:
            result.rows.append(ray_train_smoke(params["smoke_config"], params["smoke_images"],
                                               params["smoke_image_size"], cuda, Path(tmp)))
        result.columns += ["backend", "device", "steps", "epoch_s", "train_images_per_s"]
    lsnet = [r for r in result.rows if r["model"].startswith("lsnet_")]
    if cuda:
        best_infer = max((r for r in lsnet if r["amp"] == "on"), key=lambda r: r["infer_images_per_s"], default=None)
        best_train = min((r for r in lsnet if r["amp"] == "on"), key=lambda r: r["train_s_per_iter"], default=None)
        if best_infer:
            result.checks["LSNet inference images/s, AMP, batch 1 (paper R-50: 12.7 on a V100)"] = {
                "value": round(best_infer["infer_images_per_s"], 2), "target": f">= {infer_target_fps}",
                "ok": best_infer["infer_images_per_s"] >= infer_target_fps}
        if best_train:
            result.checks[f"LSNet training s/iter, AMP, {params['batch_size']} images per GPU"] = {
                "value": round(best_train["train_s_per_iter"], 4), "target": f"<= {train_target_s}",
                "ok": best_train["train_s_per_iter"] <= train_target_s}
        result.notes.append("anchors on a V100 (mmdetection): FCOS R-50 ~22.7 images/s, ATSS ~19.7, LSNet R-50 12.7")
    else:
        result.notes.insert(0, NO_GPU_NOTE)
    return result
