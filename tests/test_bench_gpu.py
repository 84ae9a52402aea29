"""``lsnet bench gpu`` at toy size on the CPU (issue 13): the GPU benchmark's code keeps working
without a GPU. Structure and the smoke run's step count are asserted, never timings."""
from __future__ import annotations

import json

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore")]

TOY = {"image_size": [64, 64], "warmup": 0, "iters": 1, "infer_warmup": 0, "infer_iters": 1,
       "backbone": "resnet18", "settings": [[True, True]], "smoke_config": "configs/tiny_bbox.yaml",
       "smoke_images": 2, "smoke_image_size": 64}


def test_gpu_benchmark_runs_at_toy_size_on_cpu(ray_session, tmp_path, capsys):
    from pipelines.bench.gpu import NO_GPU_NOTE
    from pipelines.bench.runner import run_benchmark

    record = run_benchmark("gpu", {"force_cpu": True, "toy": TOY}, out_dir=tmp_path)
    printed = capsys.readouterr().out
    assert json.loads((tmp_path / "gpu.json").read_text())["rows"] == json.loads(json.dumps(record["rows"]))
    models = [r["model"] for r in record["rows"]]
    assert models == ["lsnet_resnet18_bbox", "fcos_resnet18_fpn (torchvision)",
                      "lsnet train smoke (tiny_bbox, Ray Train, 1 worker)"]
    lsnet, fcos, smoke = record["rows"]
    for row in (lsnet, fcos):
        assert row["amp"] == "on (no effect on CPU)" and row["channels_last"] == "on"
        assert row["train_s_per_iter"] > 0 and row["infer_images_per_s"] > 0
        assert row["train_peak_mem_gib"] is None  # CUDA only
    assert lsnet["train_vs_fcos"] == pytest.approx(lsnet["train_s_per_iter"] / fcos["train_s_per_iter"])
    # the smoke trained its one step (2 images, batch 2) through Ray Train on the CPU with gloo
    assert smoke["backend"] == "gloo" and smoke["device"] == "cpu" and smoke["steps"] == 1 and smoke["images"] == 2
    assert record["checks"] == {}  # targets are for a GPU
    assert record["notes"][0] == NO_GPU_NOTE and "NO CUDA DEVICE" in printed
    assert "train_s_per_iter" in printed.splitlines()[2] or any("train_s_per_iter" in ln for ln in printed.splitlines())


def test_gpu_benchmark_rejects_unknown_toy_parameters():
    from pipelines.bench.gpu import gpu

    with pytest.raises(ValueError, match="unknown toy parameter.*'iterations'"):
        gpu(force_cpu=True, toy={"iterations": 1})
