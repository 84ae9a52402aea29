"""``lsnet bench tune``: what a Ray Tune trial costs over a plain training run (jobs/bench/tune.yaml).

In one fresh process with its own local Ray (so both see the same machine state), on tiny synthetic
shards with evaluation every epoch and MLflow tracking on:

- ``plain``: :func:`pipelines.train.driver.run_training` of the config (what ``lsnet train`` runs);
- ``one trial``: :func:`pipelines.tune.trials.run_trials` of the same config as a single-variant search
  (Tune driver, trial actor, TuneReportCallback, parent + child MLflow runs, the end-of-search report);
- ``4 trials`` at 1 and at 2 concurrent trials (1 worker each), FIFO scheduling.

Plain and one-trial runs alternate (``repeats`` pairs) so load changes on a shared machine hit both;
the overhead is the ratio of their median wall times (target <= 1.25x for a 4-epoch tiny trial).
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipelines.bench.runner import BenchResult
from pipelines.paths import REPO_ROOT
from pipelines.synthetic import synthetic_shards


def measure(args: dict) -> dict:
    """``python -m pipelines.bench.tune JSON``: the timed runs, in this fresh process with its own local
    Ray; prints ``BENCH <json>`` (the wall times) for the parent."""
    from pipelines.config import load_config
    from pipelines.ray_local import init_local_ray
    from pipelines.train.driver import run_training
    from pipelines.tune.records import SearchSettings
    from pipelines.tune.trials import run_trials

    init_local_ray(num_cpus=args["num_cpus"], include_dashboard=False, log_to_driver=False, configure_logging=False)
    cfg = load_config(args["config"], args["overrides"])
    out = {"plain": [], "trial": [], "search": {}}

    def timed(fn, *fn_args, **fn_kwargs) -> float:
        start = time.perf_counter()
        fn(*fn_args, **fn_kwargs)
        return time.perf_counter() - start

    for i in range(args["repeats"]):
        out["plain"].append(timed(run_training, cfg, run_name=f"plain{i}", verbose=False))
        settings = SearchSettings(name=f"one{i}", metric=cfg.primary_metric, scheduler="fifo", max_concurrent=1)
        out["trial"].append(timed(run_trials, cfg, [{}], settings, verbose=False))
    variants = [{"model.loss.alpha": a} for a in (0.0, 0.1, 0.2, 0.3)]
    for k in args["concurrency"]:
        settings = SearchSettings(name=f"four_c{k}", metric=cfg.primary_metric, scheduler="fifo", max_concurrent=k)
        out["search"][k] = timed(run_trials, cfg, variants, settings, verbose=False)
    return out


def tune(num_images: int = 8, image_size: int = 64, epochs: int = 4, repeats: int = 2,
         concurrency: list[int] | None = None, config: str = "configs/tiny_bbox.yaml") -> BenchResult:
    concurrency = concurrency or [1, 2]
    cores = os.cpu_count() or 2
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="lsnet-bench-tune-") as tmp:
        root = Path(tmp)
        shards, _ = synthetic_shards(root, num_images, image_size)
        overrides = [
            f"data.train_shards={shards}", f"data.val_shards={shards}",
            f"data.scale_range=[{image_size}, {image_size}]", f"data.max_size={image_size}",
            f"data.test_scale={image_size}", f"train.epochs={epochs}", "train.lr_steps=[]", "train.eval_every=1",
            "eval.num_overlays=0", "run.num_workers=1", "run.max_failures=0", f"run.storage_path={root / 'runs'}",
            # the benchmark's throwaway runs go to a store of its own, never the checkout's results/mlflow.db
            f"tracking.uri=sqlite:///{root / 'mlflow.db'}",
        ]
        args = {"num_cpus": cores, "config": str(REPO_ROOT / config), "overrides": overrides,
                "repeats": repeats, "concurrency": concurrency}
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        env.pop("MLFLOW_TRACKING_URI", None)
        proc = subprocess.run([sys.executable, "-m", "pipelines.bench.tune", json.dumps(args)], cwd=REPO_ROOT, env=env,
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"bench tune failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")][-1][6:])
    plain, trial = statistics.median(out["plain"]), statistics.median(out["trial"])
    rows = [{"run": "plain lsnet train (run_training)", "trials": 1, "concurrent": 1, "wall_s": plain,
             "walls_s": out["plain"], "vs_plain": 1.0},
            {"run": "one Tune trial (run_trials)", "trials": 1, "concurrent": 1, "wall_s": trial,
             "walls_s": out["trial"], "vs_plain": trial / plain}]
    for k, wall in out["search"].items():
        rows.append({"run": "4-trial search", "trials": 4, "concurrent": int(k), "wall_s": wall, "walls_s": [wall],
                     "vs_plain": wall / plain})
    overhead = trial / plain
    checks = {"one trial / plain run (median wall time)": {"value": round(overhead, 3), "target": "<= 1.25",
                                                           "ok": overhead <= 1.25}}
    searches = {int(k): v for k, v in out["search"].items()}
    notes = [(f"tiny LSNet ({config}), {num_images} synthetic images at {image_size} px, {epochs} epochs, 1 worker, "
             "evaluation every epoch, MLflow on (SQLite); plain and trial runs alternate, medians of "
             f"{repeats} each"),
             (f"{cores} cores on this machine; load average (1, 5, 15 min) at the start: "
             f"{tuple(round(x, 2) for x in load_start)}, at the end: {tuple(round(x, 2) for x in os.getloadavg())}"
             f" -- above {cores} the cores were shared with other work")]
    if 1 in searches and 2 in searches:
        notes.append(f"4 trials: 2 concurrent / 1 concurrent wall time = {searches[2] / searches[1]:.2f}")
    return BenchResult(rows=rows, columns=["run", "trials", "concurrent", "wall_s", "vs_plain"], checks=checks,
                       notes=notes)


if __name__ == "__main__":  # the fresh process of the benchmark (see measure)
    print("BENCH " + json.dumps(measure(json.loads(sys.argv[1]))), flush=True)
