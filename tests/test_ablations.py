"""Ablation tables (issue 10): specs, MLflow parent/child runs, rendering, regressions.

- every spec under jobs/ablations/ validates, and every variant's config at every scale loads;
- bad specs fail with one line naming the file;
- the report is built from MLflow alone: rows of the children of a parent run, paper numbers and
  ranks beside ours, the previous finished run of the same table/scale compared per variant;
  a planted regression (one stored metric edited in a copy of the store) is flagged and
  ``--fail-on-regression`` exits 1, the untouched store is not;
- the tiny Table 2 end to end through the Jobs API on the real Ray head of tests/test_jobs.py
  (4 trained variants, real numbers), and ``render`` from MLflow gives the same table.
"""
from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

import pytest
import yaml

from pipelines.ablations.spec import ABLATION_DIR, AblationSpecError, load_ablation_spec

SPECS = sorted(ABLATION_DIR.glob("*.yaml"))


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.stem)
def test_every_ablation_spec_validates(path, tmp_path):
    from pipelines.ablations.runner import variant_configs

    spec = load_ablation_spec(path)
    assert spec.name == path.stem and {"tiny", "small", "full"} <= set(spec.scales)
    if spec.name in ("table2", "table3", "cross_iou"):  # the tables run at the `signal` scale (issue 22)
        assert spec.scales["signal"].seeds >= 3
    for name, scale in spec.scales.items():
        configs = variant_configs(spec, scale, "/x/train", "/x/val", "sqlite:///x.db", tmp_path)
        trained = [v for v in spec.variants if v.kind == "train"]
        assert len(configs) == len(trained), name
        for cfg in configs.values():
            assert cfg.model.task == spec.task and cfg.tracking.experiment == spec.experiment


def test_table2_variants_configure_the_model(tmp_path):
    from pipelines.ablations.runner import variant_configs

    spec = load_ablation_spec("table2")
    cfgs = variant_configs(spec, spec.scales["tiny"], "/x", "/x", "sqlite:///x.db", tmp_path)
    got = {k: (c.model.refine, c.model.target_style, c.model.loss.init_loss) for k, c in cfgs.items()}
    assert got == {"giou_rectangle": (False, "box", "giou"), "smooth_l1_rectangle": (False, "box", "smooth_l1_box"),
                   "smooth_l1_extreme": (False, "extreme", "smooth_l1_points"),
                   "cross_iou_extreme": (False, "extreme", "cross_iou")}


def test_cross_iou_variants_compare_both_loss_forms_at_every_scale(tmp_path):
    from pipelines.ablations.runner import variant_configs

    spec = load_ablation_spec("cross_iou")
    for scale in ("tiny", "full"):  # tiny's config has the paper form, full's the reference form
        cfgs = variant_configs(spec, spec.scales[scale], "/x", "/x", "sqlite:///x.db", tmp_path)
        got = {k: (c.model.loss.vector_loss_form, c.model.center_vector, c.model.loss.alpha) for k, c in cfgs.items()}
        assert got == {"paper_a0.2": ("paper", False, 0.2), "reference_a0.2": ("reference", True, 0.2),
                       "paper_centre_a0.2": ("paper", True, 0.2), "paper_a0": ("paper", False, 0.0),
                       "paper_a0.1": ("paper", False, 0.1), "paper_a0.3": ("paper", False, 0.3)}, scale
        assert {c.model.head for c in cfgs.values()} == {"reference"}, scale  # rows differ in the loss only


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(colour="red"), "unknown config key colour"),
    (lambda d: d["scales"].update(huge=d["scales"]["tiny"]), "scales: unknown scale 'huge'"),
    (lambda d: d["scales"]["tiny"].update(config="configs/nope.yaml"), "scales.tiny.config: file not found"),
    (lambda d: d["variants"].append(dict(d["variants"][0])), "duplicate names"),
    (lambda d: d["variants"][0].update(overrides=["model.refine"]), "is not key=value"),
    (lambda d: d["variants"][0].update(pape=3), "unknown config key variants[0].pape"),
])
def test_bad_ablation_specs_fail_with_one_line(tmp_path, edit, message):
    data = yaml.safe_load((ABLATION_DIR / "table2.yaml").read_text())
    edit(data)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(AblationSpecError) as info:
        load_ablation_spec(path)
    assert "\n" not in str(info.value) and str(info.value).startswith(str(path)) and message in str(info.value)


def test_unknown_table_and_bad_variant_override_exit_2(tmp_path, capsys):
    from pipelines.cli import main

    assert main(["ablation", "run", "table99", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ablation spec not found: " in err and "(known tables: " in err and "table2" in err
    data = yaml.safe_load((ABLATION_DIR / "table2.yaml").read_text())
    data["variants"][1]["overrides"] = ["model.loss.init_los=giou"]
    path = tmp_path / "table2.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["ablation", "run", str(path), "--out", str(tmp_path)]) == 2  # before any data or training
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "variant smooth_l1_rectangle" in err and "model.loss.init_los" in err
    assert not (tmp_path / "data").exists()


def test_tables_on_the_same_dataset_share_one_prepared_copy(tmp_path):
    """The nightly job runs Table 2 then Table 3 on the same tiny dataset: the second finds it prepared
    (it used to fail on the first one's files); an interrupted preparation is rebuilt."""
    from pipelines.ablations.data import prepare_dataset

    t2, t3 = load_ablation_spec("table2"), load_ablation_spec("table3")
    first = prepare_dataset(t2, t2.scales["tiny"], tmp_path)
    manifest = Path(first[0]) / "manifest.json"
    stamp = manifest.stat().st_mtime_ns
    assert prepare_dataset(t3, t3.scales["tiny"], tmp_path) == first and manifest.stat().st_mtime_ns == stamp
    (Path(first[0]).parents[1] / "prepared.json").unlink()  # as if the first run died while preparing
    assert prepare_dataset(t3, t3.scales["tiny"], tmp_path) == first and manifest.stat().st_mtime_ns != stamp
    # another dataset spec (Table 5's persons): another folder
    t5 = load_ablation_spec("table5")
    assert prepare_dataset(t5, t5.scales["tiny"], tmp_path)[0] != first[0]


def test_upper_bound_row_is_the_papers_per_part_protocol(tiny_coco_dir, tmp_path):
    """A §4.4 upper-bound variant logs the per-part protocol (what the paper's 89.0/97.4/99.2 measure) as
    the table's metric, the two other protocols beside it (tiny_coco: 38 of 465 objects have several parts,
    so the three differ; values of `lsnet bench mask_study`)."""
    from mlflow.tracking import MlflowClient

    from pipelines.ablations.runner import _mask_upper_bound_child
    from pipelines.tracking.store import ensure_experiment, prepare_sqlite_store

    spec = load_ablation_spec("landmarks")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    prepare_sqlite_store(uri)
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, spec.experiment, uri)
    parent = client.create_run(experiment_id)
    variant = next(v for v in spec.variants if v.name == "upper_bound_18")
    _mask_upper_bound_child(spec, variant, str(tiny_coco_dir / "annotations" / "instances_train2017.json"), client,
                            experiment_id, parent.info.run_id, {"ablation_variant": variant.name})
    (child,) = client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    metrics = child.data.metrics
    assert metrics["segm_AP"] == pytest.approx(0.9037, abs=1e-4)
    assert metrics["mask_AP_total"] == pytest.approx(0.8587, abs=1e-4)
    assert metrics["mask_AP_largest"] == pytest.approx(0.8396, abs=1e-4)
    assert metrics["num_instances"] == 465 and child.info.status == "FINISHED"


# ----------------------------------------------------------------------------------------------
# Reports from MLflow (no training: runs with logged metrics, as the trainer leaves them)
# ----------------------------------------------------------------------------------------------


def _fake_run(uri: str, spec, scale: str, values: dict[str, float], listed: list[str] | None = None,
              dataset: str = "synthetic") -> str:
    """A finished parent run with one child per variant carrying ``spec.metric`` (0-1); ``listed``: the
    parent ran only these variants (``--variants``)."""
    import mlflow

    from pipelines.tracking.store import prepare_sqlite_store

    prepare_sqlite_store(uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment(spec.experiment)
    with mlflow.start_run(run_name="parent") as parent:
        mlflow.set_tags({"ablation_table": spec.name, "ablation_scale": scale, "ablation_kind": "parent",
                         "dataset": dataset, "schedule": "2 steps", "backbone": "resnet18"})
        if listed:
            mlflow.set_tag("ablation_variants", ",".join(listed))
        for name, value in values.items():
            with mlflow.start_run(run_name=name, nested=True,
                                  tags={"ablation_variant": name, "mlflow.parentRunId": parent.info.run_id}):
                mlflow.log_metric(spec.metric, value, step=4)
                mlflow.log_metric("epoch_pos_iou", 0.5, step=4)
    return parent.info.run_id


TABLE2_VALUES = {"giou_rectangle": 0.30, "smooth_l1_rectangle": 0.20, "smooth_l1_extreme": 0.10,
                 "cross_iou_extreme": 0.25}


def test_report_from_mlflow_ranks_and_previous(tmp_path):
    from pipelines.ablations.report import build_report

    spec = load_ablation_spec("table2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = _fake_run(uri, spec, "tiny", TABLE2_VALUES)
    second = _fake_run(uri, spec, "tiny", {**TABLE2_VALUES, "smooth_l1_extreme": 0.12})
    _fake_run(uri, spec, "small", {k: 0.0 for k in TABLE2_VALUES})  # another scale: never compared
    report = build_report(spec, "tiny", uri)
    assert report.parent_run_id == second and report.previous_run_id == first
    rows = {r.name: r for r in report.rows}
    assert rows["giou_rectangle"].ours == pytest.approx(30.0) and rows["giou_rectangle"].paper == 34.6
    assert [rows[k].our_rank for k in TABLE2_VALUES] == [1, 3, 4, 2]
    assert [rows[k].paper_rank for k in TABLE2_VALUES] == [1, 3, 4, 2]  # 34.6 > 34.3 > 33.8 > 31.5
    assert rows["smooth_l1_extreme"].previous == pytest.approx(10.0)
    assert report.regressions == [] and report.ranking_notes == []
    md = report.markdown()
    assert "| GIoU, rectangle | 34.6 | 30.0 | 1 | 1 | 30.0 | 0.500 |" in md
    assert "absolute numbers are NOT comparable" in md and "Backbone**: resnet18" in md
    first_report = build_report(spec, "tiny", uri, parent_id=first)
    assert first_report.previous_run_id is None
    # the same table and scale on other data is another series: never compared with these
    other = _fake_run(uri, spec, "tiny", {k: 0.0 for k in TABLE2_VALUES}, dataset="tiny_coco")
    report = build_report(spec, "tiny", uri)
    assert report.parent_run_id == other and report.previous_run_id is None and report.regressions == []


def test_run_of_some_variants_renders_those_rows(tmp_path, capsys):
    from pipelines.ablations.report import build_report
    from pipelines.cli import main

    spec = load_ablation_spec("table2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _fake_run(uri, spec, "tiny", TABLE2_VALUES)
    two = ["smooth_l1_rectangle", "cross_iou_extreme"]
    _fake_run(uri, spec, "tiny", {k: TABLE2_VALUES[k] for k in two}, listed=two)
    report = build_report(spec, "tiny", uri)
    assert [r.name for r in report.rows] == two  # not four rows with two "missing" regressions
    assert report.regressions == [] and [r.our_rank for r in report.rows] == [2, 1]
    assert [r.previous for r in report.rows] == [pytest.approx(20.0), pytest.approx(25.0)]
    assert "Paper ranking: cross_iou_extreme, smooth_l1_rectangle\nOur ranking: cross_iou_extreme, " \
           "smooth_l1_rectangle\n" in report.markdown()
    # a table the paper gives no numbers for (cross-IOU variants): no made-up paper ranking
    cross = load_ablation_spec("cross_iou")
    _fake_run(uri, cross, "tiny", {"paper_a0.2": 0.1, "paper_a0": 0.2})
    text = build_report(cross, "tiny", uri).markdown()
    assert "Paper ranking: — (the paper gives no numbers for these rows)\nOur ranking: paper_a0, paper_a0.2\n" in text
    # render never creates a store it was pointed at by mistake
    capsys.readouterr()
    missing = tmp_path / "nope" / "mlflow.db"
    assert main(["ablation", "render", "table2", "--tracking-uri", f"sqlite:///{missing}"]) == 2
    assert "no MLflow store at" in capsys.readouterr().err and not missing.parent.exists()
    # --variants names are checked before anything runs
    assert main(["ablation", "run", "table2", "--variants", "giou_rectangle,nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "no variant 'nope'" in err and "giou_rectangle" in err


def _edit_metric(db: Path, run_id: str, key: str, value: float) -> None:
    with sqlite3.connect(db) as con:
        n = con.execute("UPDATE metrics SET value = ? WHERE run_uuid = ? AND key = ?", (value, run_id, key)).rowcount
        con.execute("UPDATE latest_metrics SET value = ? WHERE run_uuid = ? AND key = ?", (value, run_id, key))
    assert n == 1


def test_planted_regression_is_flagged(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    from pipelines.ablations.report import build_report
    from pipelines.cli import main

    spec = load_ablation_spec("table2")
    db = tmp_path / "store" / "mlflow.db"
    db.parent.mkdir()
    uri = f"sqlite:///{db}"
    _fake_run(uri, spec, "tiny", TABLE2_VALUES)
    latest = _fake_run(uri, spec, "tiny", TABLE2_VALUES)
    clean = build_report(spec, "tiny", uri)
    assert clean.regressions == []
    # plant: in a copy of the store, the latest run's cross-IOU variant lost 10 AP points (tolerance 5)
    copy = tmp_path / "copy" / "mlflow.db"
    copy.parent.mkdir()
    shutil.copy(db, copy)
    child = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name(spec.experiment).experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{latest}' and tags.ablation_variant = 'cross_iou_extreme'")[0]
    _edit_metric(copy, child.info.run_id, "bbox_AP", 0.15)
    planted = build_report(spec, "tiny", f"sqlite:///{copy}")
    assert len(planted.regressions) == 1 and planted.regressions[0].startswith("cross_iou_extreme: bbox_AP 15.00 vs 25.00")
    out = tmp_path / "out"
    assert main(["ablation", "render", "table2", "--tracking-uri", f"sqlite:///{copy}", "--out", str(out),
                 "--fail-on-regression"]) == 1
    text = (out / "table2-tiny" / "table.md").read_text()
    assert "REGRESSION cross_iou_extreme" in text and "Regressions (1)" in text
    assert "REGRESSION cross_iou_extreme" in (out / "table2-tiny" / "table.html").read_text()
    assert main(["ablation", "render", "table2", "--tracking-uri", uri, "--out", str(out),
                 "--fail-on-regression"]) == 0  # the untouched store
    # within the tolerance: not a regression
    _edit_metric(copy, child.info.run_id, "bbox_AP", 0.21)
    assert build_report(spec, "tiny", f"sqlite:///{copy}").regressions == []


def test_paper_ranking_check_at_full_scale(tmp_path):
    from pipelines.ablations.report import build_report

    spec = load_ablation_spec("table2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _fake_run(uri, spec, "full", {**TABLE2_VALUES, "smooth_l1_extreme": 0.35})  # best, the paper's worst
    report = build_report(spec, "full", uri)
    assert report.ranking_notes and all(r.startswith("ranking: ") for r in report.regressions)
    assert any("smooth_l1_extreme" in r for r in report.regressions)


# ----------------------------------------------------------------------------------------------
# End to end: the tiny Table 2 through the Jobs API on the real head
# ----------------------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.long
def test_tiny_table2_job_end_to_end(ray_head, tmp_path, monkeypatch, capsys):
    import json

    from pipelines.ablations.report import build_report
    from pipelines.cli import main

    monkeypatch.setattr("pipelines.jobs.client.make_client",
                        lambda address, headers=None: _client(address, ray_head.headers))
    out = tmp_path / "ablations"
    uri = f"sqlite:///{out / 'mlflow.db'}"
    # Table 2, all four variants: Tune trials, two at a time on the head's 2 CPUs
    table_path = ABLATION_DIR / "table2.yaml"
    spec_path = tmp_path / "table2-tiny.yaml"
    spec_path.write_text(yaml.safe_dump({
        "name": "table2-tiny", "command": "ablation",
        "args": ["run", str(table_path), "--scale", "tiny", "--out", str(out), "--tracking-uri", uri,
                 "--fail-on-regression", "--set", "train.epochs=1", "--set", "train.eval_every=1"],
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": "1"}}}))
    code = main(["jobs", "submit", str(spec_path), "--address", ray_head.address, "--wait", "--timeout", "1500"])
    captured = capsys.readouterr()
    assert code == 0, captured
    table = json.loads((out / "table2-tiny" / "table.json").read_text())
    assert [r["name"] for r in table["rows"]] == ["giou_rectangle", "smooth_l1_rectangle", "smooth_l1_extreme",
                                                  "cross_iou_extreme"]
    assert all(isinstance(r["ours"], float) for r in table["rows"])
    assert all(0 <= r["extras"]["epoch_pos_iou"] <= 1 for r in table["rows"])
    assert len({r["run_id"] for r in table["rows"]}) == 4  # one child run per variant, named after it
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    assert [client.get_run(r["run_id"]).info.run_name.rsplit("-", 1)[-1] for r in table["rows"]] == [
        r["name"] for r in table["rows"]]
    # tiny scale logs no weights (tracking.log_weights=none): curves and config, no checkpoints / model
    logged = {a.path for a in client.list_artifacts(table["rows"][0]["run_id"])}
    assert "curves" in logged and not logged & {"checkpoints", "model"}, logged
    parent = client.get_run(table["parent_run_id"]).data.tags
    assert parent["lsnet.kind"] == "ablation" and parent["ray_job_submission_id"].startswith("raysubmit_")
    # its description: the rows first (MLflow's run page folds the rest), then the whole table.md
    rows, whole = parent["mlflow.note.content"].split("\n\n---\n\n", 1)
    assert whole == (out / "table2-tiny" / "table.md").read_text()
    assert rows.splitlines()[2].startswith("| Variant |")
    # Figure 4 from MLflow: the per-step curves of the four variants
    assert (out / "table2-tiny" / "figure4_pos_iou.png").stat().st_size > 10_000
    md = (out / "table2-tiny" / "table.md").read_text()
    # re-rendering from MLflow (no training) gives the same table
    spec = load_ablation_spec(table_path)
    assert build_report(spec, "tiny", uri).markdown() == md
    assert main(["ablation", "render", str(table_path), "--tracking-uri", uri, "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "table2-tiny" / "table.md").read_text() == md


def test_failed_variant_exits_1_with_the_table_of_the_rest(ray_session, tmp_path, capsys):
    """A variant whose training fails: the other variants' rows are still rendered and logged, the parent
    run is FAILED, and the command exits 1 naming the variant (no silent success)."""
    from mlflow.tracking import MlflowClient

    from pipelines.cli import main

    data = yaml.safe_load((ABLATION_DIR / "landmarks.yaml").read_text())
    data["variants"] = [{"name": "upper_bound_18", "label": "upper bound, 18 points", "kind": "mask_upper_bound",
                         "num_points": 18, "paper": 89.0},
                        {"name": "broken", "overrides": ["data.train_shards=/nonexistent/shards"]}]
    path = tmp_path / "landmarks.yaml"
    path.write_text(yaml.safe_dump(data))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    assert main(["ablation", "run", str(path), "--scale", "tiny", "--out", str(out), "--tracking-uri", uri]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("lsnet ablation run: landmarks: 1 variant(s) failed: broken: ") and "/nonexistent" in err
    table = (out / "landmarks-tiny" / "table.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| upper bound, 18 points"))
    assert float(row.split("|")[3]) > 50  # GT masks as 18-point polygons: a real mask AP
    assert "REGRESSION broken: no segm_AP in this run" in table
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name(data.get("experiment", "lsnet-ablations")).experiment_id])
    status = {r.data.tags.get("ablation_variant", "parent"): r.info.status for r in runs}
    assert status == {"parent": "FAILED", "upper_bound_18": "FINISHED", "broken": "FAILED"}


def test_resume_keeps_finished_variants_and_continues_the_failed_one(ray_session, tmp_path, capsys):
    """--resume continues the newest unfinished run under the same parent: a finished variant is not
    trained again, a failed one runs again (here its shards were missing at first)."""
    from mlflow.tracking import MlflowClient

    from pipelines.ablations.report import find_parent_runs
    from pipelines.cli import main

    late = tmp_path / "late_shards"
    data = yaml.safe_load((ABLATION_DIR / "table2.yaml").read_text())
    data.pop("curve_claim")  # names a variant this copy does not have
    data["variants"] = [{"name": "ok", "overrides": ["model.target_style=box", "model.loss.init_loss=giou"]},
                        {"name": "late", "overrides": [f"data.train_shards={late}"]}]
    path = tmp_path / "table2.yaml"
    path.write_text(yaml.safe_dump(data))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "out"
    args = ["ablation", "run", str(path), "--scale", "tiny", "--out", str(out), "--tracking-uri", uri,
            "--set", "train.epochs=1", "--set", "train.eval_every=1"]
    assert main(args) == 1
    assert "late: " in capsys.readouterr().err
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("lsnet-ablations").experiment_id

    def children() -> dict[str, list]:
        found: dict[str, list] = {}
        for run in client.search_runs([experiment], "tags.ablation_variant != ''"):
            found.setdefault(run.data.tags["ablation_variant"], []).append(run)
        return found

    before = children()
    assert [r.info.status for r in before["ok"]] == ["FINISHED"] and before["late"][0].info.status == "FAILED"
    shutil.copytree(next((out / "data").glob("bbox-*/shards/train")), late)  # the shards arrive
    assert main(args + ["--resume"]) == 0, capsys.readouterr().err
    after = children()
    (parent,) = find_parent_runs(client, experiment, "table2", "tiny")  # the same parent run, finished now
    assert parent.info.status == "FINISHED"
    assert [r.info.run_id for r in after["ok"]] == [before["ok"][0].info.run_id]  # not trained again
    ok_dir = next((out / "runs").glob("table2-tiny-*/trials/*00000"))
    assert len((ok_dir / "epochs.jsonl").read_text().splitlines()) == 1
    assert [r.info.run_id for r in after["late"]] == [before["late"][0].info.run_id]
    assert after["late"][0].info.status == "FINISHED" and "bbox_AP" in after["late"][0].data.metrics
    table = (out / "table2-tiny" / "table.md").read_text()
    assert "Regressions (0)" in table
    capsys.readouterr()
    assert main(args + ["--resume"]) == 2  # nothing left to resume
    assert "no unfinished table2/tiny run" in capsys.readouterr().err
    # several tables (a killed nightly job): one with nothing to resume is skipped; none at all is an error
    assert main(args[:2] + [str(path), "table3"] + args[3:] + ["--resume"]) == 2
    captured = capsys.readouterr()
    assert captured.out.count(": skipped") == 2 and "none of table2, table3 has an unfinished run" in captured.err


def _client(address, headers):
    from ray.job_submission import JobSubmissionClient

    return JobSubmissionClient(address, headers=headers)
