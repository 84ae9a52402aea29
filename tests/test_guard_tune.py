"""Guards for ``lsnet tune`` (issue 24, rows 1-3, 18, 19): what a search reserves, which ranges it
accepts, how --search grid crosses its lists, which epoch a min-mode report calls best, and what
--resume restores. No Ray cluster: :func:`run_trials` runs up to ``Tuner.fit()`` against a recording
stand-in for Tune's Tuner (the search settings and param space it would have started are checked).
"""
from __future__ import annotations

import itertools
import json
import types
from pathlib import Path
from typing import ClassVar

import pytest
import yaml

from lsnet.config import ConfigError
from pipelines.config import load_config

REPO_ROOT = Path(__file__).resolve().parent.parent


def _cfg(tmp_path: Path, *extra: str):
    return load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml",
                       [f"run.storage_path={tmp_path / 'searches'}", "tracking.enabled=false", "train.epochs=3",
                        "train.lr_steps=[]", "run.num_workers=1", *extra])


# ------------------------------------------------------------------------------------------------
# row 1: a GPU trial with explicit per-worker resources still reserves its GPUs


def test_use_gpu_with_explicit_worker_resources_reserves_one_gpu_per_worker():
    from pipelines.tune.trials import concurrent_trials, trial_resources

    cfg = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml",
                      ["run.use_gpu=true", "run.num_workers=2", "run.resources_per_worker={CPU: 3}"])
    need = trial_resources(cfg)
    assert need["GPU"] == 2.0 and need["CPU"] == 6.0
    # a cluster of 16 CPUs and 2 GPUs holds one such trial at a time, not five (CPU-bound count)
    assert concurrent_trials(need, {"CPU": 16.0, "GPU": 2.0, "memory": 2.0**34}, None) == 1
    with pytest.raises(ConfigError, match="needs 6 CPU, 2 GPU"):
        concurrent_trials(need, {"CPU": 16.0, "GPU": 1.0, "memory": 2.0**34}, None)
    # an explicit GPU count per worker is kept as given (e.g. two trials sharing one GPU)
    half = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml",
                       ["run.use_gpu=true", "run.num_workers=1", "run.resources_per_worker={CPU: 1, GPU: 0.5}"])
    assert trial_resources(half)["GPU"] == 0.5
    # and without use_gpu no GPU is reserved
    cpu = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml", ["run.num_workers=2", "run.resources_per_worker={CPU: 3}"])
    assert "GPU" not in trial_resources(cpu)


def test_lsnet_train_reserves_one_gpu_per_worker_with_explicit_worker_resources():
    """(second path of row 1) ``lsnet train``'s own check of the cluster before Ray Train starts."""
    from pipelines.config import required_resources
    from pipelines.train.driver import ClusterResourceError, check_cluster_resources

    cfg = load_config(REPO_ROOT / "configs" / "tiny_bbox.yaml",
                      ["run.use_gpu=true", "run.num_workers=2", "run.resources_per_worker={CPU: 3}"])
    assert required_resources(cfg) == {"CPU": 6.0, "GPU": 2.0}
    check_cluster_resources(cfg, lambda: {"CPU": 8.0, "GPU": 2.0}, wait_s=0)
    with pytest.raises(ClusterResourceError, match=r"needs \{CPU: 6, GPU: 2\}, but the Ray cluster has CPU 16, GPU 1"):
        check_cluster_resources(cfg, lambda: {"CPU": 16.0, "GPU": 1.0}, wait_s=0)


# ------------------------------------------------------------------------------------------------
# row 2: degenerate ranges


@pytest.mark.parametrize("domain", [{"uniform": [0.1, 0.1]}, {"loguniform": [0.01, 0.01]}, {"randint": [3, 3]},
                                    {"uniform": [0.3, 0.1]}, {"randint": [4, 3]}])
def test_empty_search_range_is_refused_naming_file_and_key(tmp_path, domain):
    from pipelines.tune.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"space": {"model.loss.alpha": domain}}))
    with pytest.raises(ConfigError, match=rf"^{path}: model.loss.alpha: .*lo < hi"):
        load_space(path)


@pytest.mark.parametrize("domain", [{"grid": [18, 18]}, {"choice": [0.1, 0.2, 0.1]}])
def test_a_list_domain_with_a_repeated_value_is_refused(tmp_path, domain):
    """(hole next to row 2) a repeated grid value would train the same trial twice."""
    from pipelines.tune.space import load_space

    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump({"space": {"model.x": domain}}))
    with pytest.raises(ConfigError, match=rf"^{path}: model.x: .*repeat"):
        load_space(path)


@pytest.mark.parametrize("field, value, message", [
    ("num_samples", 0, "num_samples must be >= 1"),
    ("grace_period", 0, "grace_period must be >= 1"),
    ("reduction_factor", 1.0, "reduction_factor must be > 1"),
    ("max_concurrent", 0, "max_concurrent must be >= 1"),
    ("max_failures", -1, "max_failures must be >= 0"),
    ("mode", "maximum", "mode"),
])
def test_search_settings_refuse_degenerate_values(field, value, message):
    """(hole next to row 2) --num-samples 0 / --reduction-factor 1 were passed on to Tune."""
    from pipelines.tune.trials import SearchSettings

    with pytest.raises(ConfigError, match=message):
        SearchSettings("s", "bbox_AP", **{field: value})


# ------------------------------------------------------------------------------------------------
# run_trials up to Tuner.fit() (rows 3 and 19)


class _RecordingTuner:
    """Stands in for ``ray.tune.Tuner``: records how it was made; ``fit()`` returns no results."""

    made: ClassVar[list] = []

    def __init__(self, trainable, *, param_space=None, tune_config=None, run_config=None):
        self.how, self.param_space, self.tune_config = "new", param_space, tune_config
        _RecordingTuner.made.append(self)

    @classmethod
    def restore(cls, path, trainable, **kwargs):
        tuner = cls.__new__(cls)
        tuner.how, tuner.param_space, tuner.tune_config = "restore", None, None
        cls.made.append(tuner)
        return tuner

    def fit(self):
        return []


@pytest.fixture
def offline_tune(monkeypatch):
    """run_trials without a Ray cluster: returns the list of finish_search calls' settings."""
    import ray
    from ray import tune

    import pipelines.ray_local
    import pipelines.tune.trials

    finished: list = []
    _RecordingTuner.made = []
    monkeypatch.setattr(pipelines.ray_local, "start_ray", lambda **kwargs: None)
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 2.0, "memory": 2.0**33})
    monkeypatch.setattr(tune, "Tuner", _RecordingTuner)
    monkeypatch.setattr(tune, "with_parameters", lambda trainable, **kwargs: trainable)
    monkeypatch.setattr(pipelines.tune.trials, "finish_search",
                        lambda grid, base, settings, *args, **kwargs: finished.append(settings) or settings)
    return finished


def _count_variants(param_space: dict) -> int:
    """How many trials Tune's variant generator makes of one sample of ``param_space``."""
    from ray.tune.search.variant_generator import generate_variants

    return sum(1 for _ in generate_variants(param_space))


def test_grid_search_crosses_choice_lists(tmp_path, offline_tune):
    from pipelines.tune.space import SearchSpace
    from pipelines.tune.trials import SearchSettings, run_trials

    values = {"model.loss.alpha": [0.0, 0.1], "model.loss.gamma": [1.0, 2.0, 3.0]}
    space = SearchSpace({key: ("choice", v) for key, v in values.items()})
    run_trials(_cfg(tmp_path), space, SearchSettings("g", "bbox_AP", search="grid"), verbose=False)
    (tuner,) = _RecordingTuner.made
    assert tuner.how == "new" and tuner.tune_config.num_samples == 1
    assert _count_variants(tuner.param_space) == 6  # every pair once
    from ray.tune.search.variant_generator import generate_variants

    seen = {tuple(sorted(cfg["overrides"].items())) for _, cfg in generate_variants(tuner.param_space)}
    assert seen == {tuple(sorted(zip(values, combo))) for combo in itertools.product(*values.values())}


def test_random_search_samples_choice_lists_and_crosses_grid_lists(tmp_path, offline_tune):
    """The other value of the same switch: --search random keeps a choice a single draw per sample."""
    from pipelines.tune.space import SearchSpace
    from pipelines.tune.trials import SearchSettings, run_trials

    space = SearchSpace({"model.loss.alpha": ("choice", [0.0, 0.1]), "model.loss.gamma": ("grid", [1.0, 2.0, 3.0])})
    run_trials(_cfg(tmp_path), space, SearchSettings("r", "bbox_AP", search="random", num_samples=2), verbose=False)
    (tuner,) = _RecordingTuner.made
    assert tuner.tune_config.num_samples == 2 and _count_variants(tuner.param_space) == 3


def test_resume_restores_the_saved_search_settings(tmp_path, offline_tune):
    """``lsnet tune --name s --resume`` with other flags (or none: the defaults) continues the search
    as it was started: its metric, mode, scheduler and search algorithm are the saved ones."""
    from pipelines.tune.space import SearchSpace
    from pipelines.tune.trials import SEARCH_FILE, SearchSettings, run_trials

    space = SearchSpace({"model.loss.alpha": ("grid", [0.0, 0.1])})
    started = SearchSettings("s", "loss", mode="min", scheduler="fifo", search="grid", num_samples=3,
                             max_concurrent=1, max_failures=2, seed=7, grace_period=2, reduction_factor=3.0)
    run_trials(_cfg(tmp_path), space, started, verbose=False)
    saved = json.loads((tmp_path / "searches" / "s" / SEARCH_FILE).read_text())["settings"]
    assert saved["metric"] == "loss" and saved["mode"] == "min"
    # the command line of the resume: the CLI's defaults
    run_trials(_cfg(tmp_path), space, SearchSettings("s", "bbox_AP"), resume=True, verbose=False)
    assert [t.how for t in _RecordingTuner.made] == ["new", "restore"]
    assert offline_tune[-1] == started
    # a search that was never started cannot be resumed
    with pytest.raises(ConfigError, match="--resume: no search 'other'"):
        run_trials(_cfg(tmp_path), space, SearchSettings("other", "bbox_AP"), resume=True, verbose=False)
    # and a started one cannot be started again under the same name
    with pytest.raises(ConfigError, match="already exists"):
        run_trials(_cfg(tmp_path), space, started, verbose=False)


# ------------------------------------------------------------------------------------------------
# row 18: a min-mode search's best epoch is its lowest


def _result(trial_id: str, rows: list[dict], error=None):
    import pandas as pd

    return types.SimpleNamespace(path=f"/searches/s/{trial_id}", config={"overrides": {"model.loss.alpha": 0.1}},
                                 metrics_dataframe=pd.DataFrame(rows), metrics=None, error=error)


@pytest.mark.parametrize("mode, best", [("min", 0.5), ("max", 0.9)])
def test_report_best_epoch_follows_the_mode(tmp_path, mode, best):
    from pipelines.tune.report import trial_records
    from pipelines.tune.trials import SearchSettings

    rows = [{"epoch": 1, "loss": 0.9}, {"epoch": 2, "loss": 0.5}, {"epoch": 3, "loss": 0.7}]
    (record,) = trial_records([_result("t1", rows)], _cfg(tmp_path), SearchSettings("s", "loss", mode=mode),
                              tmp_path)
    assert record.best_metric == best and record.final_metric == 0.7
    assert record.status == "FINISHED" and record.epochs_run == 3 and record.history == [(1, 0.9), (2, 0.5), (3, 0.7)]


def test_report_status_early_stopped_and_failed(tmp_path):
    """(hole next to row 18) the status of a record comes from its epochs and its error."""
    from pipelines.tune.report import trial_records
    from pipelines.tune.trials import SearchSettings

    grid = [_result("b", [{"epoch": 1, "loss": 0.9}]),
            _result("a", [{"epoch": 1, "loss": 0.4}], error=RuntimeError("Traceback\nValueError: boom")),
            _result("c", [{"epoch": 1}, {"epoch": 2}, {"epoch": 3}])]
    records = trial_records(grid, _cfg(tmp_path), SearchSettings("s", "loss", mode="min"), tmp_path)
    assert [(r.trial_id, r.status, r.epochs_run) for r in records] == [
        ("a", "FAILED", 1), ("b", "EARLY_STOPPED", 1), ("c", "FINISHED", 3)]
    assert records[0].error == "ValueError: boom" and records[2].best_metric is None
    assert records[1].run_dir == tmp_path / "trials" / "s-b"
