"""Guards for ablation reports and ``--resume`` (issue 24, rows 4-6 and 20): which earlier run a table
is compared with (finished, same data, same schedule), which way a lower-is-better metric regresses,
and what an interrupted run resumes with. MLflow runs are made by hand in a private SQLite store;
no training, no Ray."""
from __future__ import annotations

import dataclasses
import json

import pytest

from pipelines.ablations.spec import load_ablation_spec

VALUES = {"giou_rectangle": 0.30, "smooth_l1_rectangle": 0.20, "smooth_l1_extreme": 0.10, "cross_iou_extreme": 0.25}
_clock = iter(range(1_700_000_000_000, 1_800_000_000_000, 60_000))  # strictly increasing start times


def _parent(uri: str, spec, values: dict[str, float], status: str = "FINISHED", schedule: str = "2 steps",
            dataset: str = "synthetic", scale: str = "tiny") -> str:
    """A parent run of ``spec`` (with ``status``) and one finished child per variant holding ``spec.metric``."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.store import ensure_experiment, prepare_sqlite_store

    prepare_sqlite_store(uri)
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, spec.experiment, uri)
    parent = client.create_run(experiment, start_time=next(_clock), tags={
        "ablation_table": spec.name, "ablation_scale": scale, "ablation_kind": "parent", "dataset": dataset,
        "schedule": schedule, "backbone": "resnet18"}).info.run_id
    for name, value in values.items():
        child = client.create_run(experiment, start_time=next(_clock), tags={
            "ablation_variant": name, "mlflow.parentRunId": parent}).info.run_id
        client.log_metric(child, spec.metric, value, step=4)
        client.set_terminated(child, "FINISHED")
    if status != "RUNNING":
        client.set_terminated(parent, status)
    return parent


def _lower_is_better():
    """Table 2 on a loss: lower is better, tolerance 0.05 (absolute, not a percentage)."""
    return dataclasses.replace(load_ablation_spec("table2"), metric="epoch_loss_reg", higher_is_better=False,
                               tolerance=0.05)


def test_lower_is_better_regresses_upwards(tmp_path):
    from pipelines.ablations.report import build_report

    spec = _lower_is_better()
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _parent(uri, spec, {"giou_rectangle": 0.50, "smooth_l1_rectangle": 0.50, "cross_iou_extreme": 0.50})
    # one much lower (better), one much higher (worse), one slightly higher (within the tolerance)
    latest = _parent(uri, spec, {"giou_rectangle": 0.20, "smooth_l1_rectangle": 0.80, "cross_iou_extreme": 0.54})
    report = build_report(spec, "tiny", uri)
    assert report.parent_run_id == latest
    rows = {r.name: r for r in report.rows if r.ours is not None}
    assert [r.our_rank for r in rows.values()] == [1, 3, 2]  # the lowest loss ranks first
    regressions = [r for r in report.regressions if not r.endswith("in this run")]
    assert len(regressions) == 1 and regressions[0].startswith(
        "smooth_l1_rectangle: epoch_loss_reg 0.80 vs 0.50 in the previous run (worse by 0.30 > tolerance 0.05)")
    # the same numbers with higher-is-better: the drop of giou_rectangle is the regression
    higher = build_report(dataclasses.replace(spec, higher_is_better=True), "tiny", uri)
    assert [r.split(":")[0] for r in higher.regressions if not r.endswith("in this run")] == ["giou_rectangle"]


@pytest.mark.parametrize("status", ["FAILED", "RUNNING", "KILLED"])
def test_previous_run_is_the_last_finished_one(tmp_path, status):
    """A run that failed, was killed or still runs between two finished ones is neither compared with nor
    (as the newest) rendered by default."""
    from pipelines.ablations.report import build_report

    spec = load_ablation_spec("table2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _parent(uri, spec, VALUES)
    broken = _parent(uri, spec, {k: 0.0 for k in VALUES}, status=status)
    latest = _parent(uri, spec, VALUES)
    report = build_report(spec, "tiny", uri)
    assert (report.parent_run_id, report.previous_run_id) == (latest, first)
    assert report.regressions == []
    # rendering the unfinished one explicitly still compares it with the finished one before it
    assert build_report(spec, "tiny", uri, parent_id=broken).previous_run_id == first
    # newest of all unfinished: the default report is the newest *finished* run
    _parent(uri, spec, {k: 0.0 for k in VALUES}, status=status)
    assert build_report(spec, "tiny", uri).parent_run_id == latest


def test_previous_run_must_have_the_same_schedule_and_dataset(tmp_path):
    from pipelines.ablations.report import build_report

    spec = load_ablation_spec("table2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    same = _parent(uri, spec, VALUES)
    _parent(uri, spec, {k: 0.9 for k in VALUES}, schedule="40 epochs")  # another schedule: never compared
    _parent(uri, spec, {k: 0.9 for k in VALUES}, dataset="coco_mini")  # another dataset: never compared
    _parent(uri, spec, {k: 0.9 for k in VALUES}, scale="small")  # another scale: never compared
    latest = _parent(uri, spec, VALUES)
    report = build_report(spec, "tiny", uri)
    assert (report.parent_run_id, report.previous_run_id) == (latest, same)
    assert report.regressions == [] and [r.previous for r in report.rows] == [pytest.approx(100 * v)
                                                                                for v in VALUES.values()]
    long = build_report(spec, "tiny", uri, parent_id=_parent(uri, spec, VALUES, schedule="40 epochs"))
    assert long.previous_run_id is not None and long.previous_run_id not in (same, latest)
    assert len(long.regressions) == 4  # 90 -> 30, ... on the same schedule


# ------------------------------------------------------------------------------------------------
# row 20: --resume keeps the interrupted run's own --set overrides and variants


class _Stop(Exception):
    pass


def test_resume_uses_the_interrupted_runs_overrides_and_variants(tmp_path, monkeypatch):
    from pipelines.ablations import runner

    spec = load_ablation_spec("table2")
    out = tmp_path / "out"
    run_dir = out / "runs" / "table2-tiny-20260101-000000"
    run_dir.mkdir(parents=True)
    (run_dir / runner.RUN_FILE).write_text(json.dumps(
        {"table": "table2", "scale": "tiny", "variants": ["giou_rectangle", "cross_iou_extreme"],
         "overrides": ["train.epochs=1", "train.eval_every=1"]}))
    seen = {}
    real_variant_configs = runner.variant_configs

    def variant_configs(spec, scale, train, val, uri, out, overrides=None, variants=None):
        seen["validated"] = (list(overrides or []), [v.name for v in variants])
        return real_variant_configs(spec, scale, train, val, uri, out, overrides, variants)

    def base_config(spec, scale, train, val, uri, out, overrides=None):
        seen["base"] = list(overrides or [])
        raise _Stop  # everything after this trains

    monkeypatch.setattr(runner, "variant_configs", variant_configs)
    monkeypatch.setattr(runner, "prepare_dataset", lambda spec, scale, root: ("/d/train", "/d/val", None))
    monkeypatch.setattr(runner, "base_config", base_config)
    with pytest.raises(_Stop):
        runner.run_ablation(spec, "tiny", out, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            overrides=["train.epochs=7"], only=["smooth_l1_extreme"], resume=True, verbose=False)
    saved = ["train.epochs=1", "train.eval_every=1"]
    assert seen == {"validated": (saved, ["giou_rectangle", "cross_iou_extreme"]), "base": saved}
    # without --resume the command line's choices are used
    seen.clear()
    with pytest.raises(_Stop):
        runner.run_ablation(spec, "tiny", out, tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}",
                            overrides=["train.epochs=7"], only=["smooth_l1_extreme"], verbose=False)
    assert seen == {"validated": (["train.epochs=7"], ["smooth_l1_extreme"]), "base": ["train.epochs=7"]}


def test_resume_picks_the_newest_unfinished_run_only(tmp_path):
    """(hole next to row 20) an older unfinished run superseded by a newer finished one is not resumed."""
    from pipelines.ablations.runner import RUN_FILE, NothingToResume, resumable_run
    from pipelines.tracking.tracker import RunTracker
    from pipelines.tune.trials import PARENT_DIRNAME

    runs = tmp_path / "runs"
    for stamp, overrides in (("20260101-000000", ["a=1"]), ("20260102-000000", ["b=2"])):
        (runs / f"table2-tiny-{stamp}").mkdir(parents=True)
        (runs / f"table2-tiny-{stamp}" / RUN_FILE).write_text(json.dumps({"variants": ["x"], "overrides": overrides}))
    (runs / "table2-tiny-20260103-000000").mkdir()  # killed before it wrote its choices: not a candidate
    (runs / "table3-tiny-20260104-000000").mkdir()
    (runs / "table3-tiny-20260104-000000" / RUN_FILE).write_text(json.dumps({"variants": ["y"], "overrides": []}))
    assert resumable_run(runs, "table2", "tiny") == ("table2-tiny-20260102-000000",
                                                     {"variants": ["x"], "overrides": ["b=2"]})
    tracker = RunTracker(runs / "table2-tiny-20260102-000000" / PARENT_DIRNAME,
                         f"sqlite:///{tmp_path / 'mlflow.db'}", background=False, verbose=False)
    tracker.close("FINISHED")
    with pytest.raises(NothingToResume, match="the newest, table2-tiny-20260102-000000, finished"):
        resumable_run(runs, "table2", "tiny")
