"""``lsnet ablation run|render TABLE``: train the variants of a paper ablation table, render it.

A run (one table at one scale):

1. prepares the scale's dataset (synthetic / COCO JSON + images -> shards, cached under
   ``<out>/data/``; ``executor="local"`` preprocessing for the small sets);
2. opens an MLflow *parent run* (tags ``ablation_table``, ``ablation_scale``, ``git_commit``) and
   trains the variants as Tune trials of :func:`pipelines.tune.trials.run_trials` (FIFO, as many at
   once as the cluster holds), each a Ray Train run whose MLflow run is a *child* of the parent
   (``mlflow.parentRunId``; tag ``ablation_variant``); the §4.4 upper-bound variants are evaluated
   without training (:mod:`lsnet.mask_study`);
3. reads the children's final metrics back from MLflow (the same code path as ``render``), compares
   them with the previous finished parent run of the same table, scale, dataset and schedule (per
   variant, the spec's tolerance) and with the paper's ranking, renders Markdown + HTML into
   ``<out>/<table>-<scale>/``, plots Figure 4 (per-step ``pos_iou`` / ``loss_cls`` of every variant,
   from MLflow), logs it all on the parent run and tags it ``regressions=<count>``.

``render`` does step 3 only, for an existing parent run (default: the latest finished one).
"""
from __future__ import annotations

import datetime as _dt
import html
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from lsnet.config import ConfigError
from pipelines.ablations.spec import REPO_ROOT, AblationSpec, ScaleSpec

#: metrics shown as percentages (the paper's unit)
PERCENT_PREFIXES = ("bbox_AP", "segm_AP", "kp_AP", "mask_AP")
#: per-variant extras read from the child runs (Figure 4: final mean IoU of positives, classification loss)
EXTRA_METRICS = ("epoch_pos_iou", "epoch_loss_cls")


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def check_data_present(spec: AblationSpec, scale: ScaleSpec) -> None:
    """A ``coco`` scale's annotation files and image folders exist; else one line naming the key, and for
    the real subsets of ``data/`` which ``lsnet data fetch`` to run."""
    d = scale.data
    if d.source != "coco":
        return
    if d.ann is None or d.images is None:
        raise ConfigError(f"{spec.name}: data.source=coco needs data.ann and data.images")
    for key in ("ann", "images", "val_ann", "val_images"):
        path = getattr(d, key)
        if path is not None and not Path(_repo_path(path)).exists():
            from lsnet.data.fetch import missing_data_message

            raise ConfigError(missing_data_message(path, f"{spec.name}: data.{key}")
                              or f"{spec.name}: data.{key}: {_repo_path(path)} not found")


def prepare_dataset(spec: AblationSpec, scale: ScaleSpec, data_root: Path) -> tuple[str, str, str | None]:
    """Shards for the scale: ``(train_shards, val_shards, mask_study_json)``.

    Cached under ``data_root/<task>-<dataset>-<hash of the data spec>/``: tables sharing a dataset (the
    nightly job runs Table 2 and Table 3 on the same one) prepare it once. ``prepared.json`` is written
    last: a folder without it (an interrupted preparation) is rebuilt; a lock file keeps two runs on
    the same machine from building it at once."""
    import dataclasses
    import fcntl
    import hashlib
    import shutil

    d = scale.data
    if d.source == "shards":
        if not d.train_shards:
            raise ConfigError(f"{spec.name}: data.source=shards needs data.train_shards")
        return d.train_shards, d.val_shards or d.train_shards, d.val_ann or d.ann
    check_data_present(spec, scale)
    identity = json.dumps({"task": spec.task, **dataclasses.asdict(d)}, sort_keys=True)
    slug = re.sub(r"[^A-Za-z0-9_.-]+", "-", scale.dataset_name).strip("-")[:40]
    root = Path(data_root) / f"{spec.task}-{slug}-{hashlib.sha256(identity.encode()).hexdigest()[:10]}"
    done = root / "prepared.json"
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if done.exists():
            return tuple(json.loads(done.read_text())["paths"])
        shutil.rmtree(root, ignore_errors=True)  # ours, and incomplete
        paths = _build_dataset(spec, d, root)
        done.write_text(json.dumps({"dataset": identity, "paths": list(paths)}, indent=1))
        return paths


def _build_dataset(spec: AblationSpec, d, root: Path) -> tuple[str, str, str | None]:
    from pipelines.preprocess import preprocess

    points = tuple(d.contour_points)
    if d.source == "synthetic":
        from lsnet.data.synthetic import write_synthetic_coco

        synth = write_synthetic_coco(root / "synth", num_images=d.num_images, image_size=(d.image_size, d.image_size),
                                     seed=d.seed, objects_per_image=(1, 3), person_prob=d.person_prob)
        ann = synth.keypoints_json if spec.task == "pose" else synth.instances_json
        images = synth.image_dir
        val_ann = val_images = None
    else:
        ann, images, val_ann, val_images = (_repo_path(x) for x in (d.ann, d.images, d.val_ann, d.val_images))
    train = root / "shards" / "train"
    preprocess(ann, images, train, max_size=d.max_size, contour_points=points, executor="local", verbose=False)
    if val_ann is None:  # no held-out split: evaluate on the training images (said in the report)
        return str(train), str(train), str(ann)
    val = root / "shards" / "val"
    preprocess(val_ann, val_images, val, max_size=d.max_size, contour_points=points, executor="local",
               verbose=False)
    return str(train), str(val), str(val_ann)


def _repo_path(path: str | None) -> str | None:
    if path is None or "://" in path or Path(path).is_absolute():
        return path
    return str((REPO_ROOT / path).resolve())


# --------------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------------


def run_ablation(spec: AblationSpec, scale_name: str, out: Path, tracking_uri: str | None = None,
                 overrides: list[str] | None = None, address: str | None = None, verbose: bool = True,
                 only: list[str] | None = None, resume: bool = False) -> Report:
    """Train the variants of ``spec`` at ``scale_name`` (``only``: a subset, by name) and render the table.

    The trained variants are Tune trials of :func:`pipelines.tune.trials.run_trials` (FIFO, each run to
    the end; as many at once as the Ray cluster holds), MLflow children of the table's parent run.
    Raises :class:`AblationFailed` (after rendering what there is) when a variant failed.

    ``resume``: continue the newest run of this table and scale under ``out`` that did not finish
    (killed, or a variant failed) with its own variants and overrides: finished variants are kept,
    the others continue from their last checkpoints, under the same parent run.
    """
    from mlflow.tracking import MlflowClient

    from lsnet.bench import git_commit
    from pipelines.tracking import (
        ensure_experiment,
        mlflow_system_tags,
        prepare_sqlite_store,
        resolve_tracking_uri,
    )
    from pipelines.tune.trials import (
        SEARCH_FILE,
        SearchSettings,
        open_parent_tracker,
        run_trials,
        variant_key,
    )

    scale = spec.scale(scale_name)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if resume:  # the interrupted run's own choices, whatever this command line says
        name, saved = resumable_run(out / "runs", spec.name, scale_name)
        only, overrides = saved["variants"], saved["overrides"]
        if verbose:
            print(f"[ablation {spec.name}/{scale_name}] resuming {name}", flush=True)
    variants = select_variants(spec, only)
    uri = resolve_tracking_uri(tracking_uri)  # default: the checkout's shared store
    trained = [v for v in variants if v.kind == "train"]
    variant_configs(spec, scale, "/validate/train", "/validate/val", uri, out, overrides, trained)  # fail fast
    prepare_sqlite_store(uri)
    train_shards, val_shards, mask_json = prepare_dataset(spec, scale, out / "data")
    base = base_config(spec, scale, train_shards, val_shards, uri, out, overrides)
    if not resume:
        name = f"{spec.name}-{scale_name}-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%d-%H%M%S')}"
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, spec.experiment, uri)  # model training, artifacts beside the DB
    search_dir = Path(base.run.storage_path) / name
    parent = open_parent_tracker(search_dir, uri, spec.experiment, name, verbose=False)
    common = {"ablation_table": spec.name, "ablation_scale": scale_name}
    if resume:
        parent.reopen()
    else:
        (search_dir / RUN_FILE).write_text(json.dumps(
            {"table": spec.name, "scale": scale_name, "variants": [v.name for v in variants],
             "overrides": list(overrides or [])}, indent=1))
        commit = git_commit()
        parent.set_tags({**mlflow_system_tags("lsnet ablation", commit), "git_commit": commit, **common,
                         "ablation_kind": "parent", "dataset": scale.dataset_name, "schedule": scale.schedule,
                         "backbone": base.model.backbone, "ablation_variants": ",".join(v.name for v in variants),
                         "lsnet.kind": "ablation"})
    if not parent.flush() or not parent.run_id:
        raise ConfigError(f"{spec.name}: cannot open the parent MLflow run at {uri}")
    failed: list[str] = []
    try:
        if trained:
            if verbose:
                print(f"[ablation {spec.name}/{scale_name}] training {len(trained)} variant(s): "
                      f"{', '.join(v.name for v in trained)}", flush=True)
            settings = SearchSettings(name=name, metric=spec.metric, mode="max" if spec.higher_is_better else "min",
                                      scheduler="fifo", search="grid")
            overrides_of = {v.name: variant_overrides(v) for v in trained}
            outcome = run_trials(
                base, list(overrides_of.values()), settings, address=address or scale.address,
                verbose=verbose, source=f"{spec.name} ({scale_name})", parent=parent, source_name="lsnet ablation",
                # (a run killed before its trials started has no Tune state: they start now)
                resume=resume and (search_dir / SEARCH_FILE).exists(), retry_failed=True,
                # readable child names in MLflow (the Train run directories keep Tune's trial ids)
                variant_tags=[{**common, "ablation_variant": v.name, "mlflow.runName": f"{name}-{v.name}"}
                              for v in trained])
            by_key = {variant_key(r.values): r for r in outcome.trials}
            for v in trained:
                record = by_key.get(variant_key(overrides_of[v.name]))
                if record is None or record.status != "FINISHED":
                    failed.append(f"{v.name}: {record.error if record else 'no trial ran'}")
        done = _children(client, [experiment_id], parent.run_id) if resume else {}
        for v in variants:
            if v.kind == "mask_upper_bound" and v.name not in done:
                _mask_upper_bound_child(spec, v, mask_json, client, experiment_id, parent.run_id,
                                        {**common, "ablation_variant": v.name})
        parent.flush()  # the report reads the parent's tags back from MLflow
        report = build_report(spec, scale_name, uri, parent.run_id)
        folder = out / f"{spec.name}-{scale_name}"
        report.write(folder)
        report.files += plot_curves(report, uri, folder)
        for path in report.files:
            parent.log_artifact(path, "report")
        parent.set_tags({"mlflow.note.content": report.markdown()[:7500],  # the run page's Description
                         "regressions": str(len(report.regressions)),
                         "regression_list": "; ".join(report.regressions)[:4000] or "none",
                         "failed_variants": "; ".join(failed)[:4000] or "none"})
        parent.close("FAILED" if failed else "FINISHED")
    except BaseException:
        parent.close("FAILED")
        raise
    if failed:
        raise AblationFailed(report, failed)
    return report


class NothingToResume(ConfigError):
    """``--resume`` found no unfinished run of the table (its newest run finished, or none exists)."""


#: what a run was started with (its variants and --set overrides), in its search directory: --resume reads it
RUN_FILE = "ablation.json"


def resumable_run(runs_dir: Path, table: str, scale: str) -> tuple[str, dict]:
    """``(name, saved)`` of the newest run of ``table``/``scale`` under ``runs_dir`` whose parent run did
    not finish; ConfigError when there is none."""
    from pipelines.tracking import Journal
    from pipelines.tune.trials import PARENT_DIRNAME

    pattern = re.compile(rf"{re.escape(table)}-{re.escape(scale)}-\d{{8}}-\d{{6}}")
    candidates = sorted((p for p in Path(runs_dir).glob(f"{table}-{scale}-*")
                         if pattern.fullmatch(p.name) and (p / RUN_FILE).exists()), reverse=True)
    newest = candidates[0] if candidates else None  # older ones were superseded by it
    if newest is not None and not (Journal.exists(newest / PARENT_DIRNAME)
                                   and Journal(newest / PARENT_DIRNAME).end_status() == "FINISHED"):
        return newest.name, json.loads((newest / RUN_FILE).read_text())
    raise NothingToResume(f"--resume: no unfinished {table}/{scale} run in {runs_dir}"
                      + (f" (the newest, {candidates[0].name}, finished)" if candidates else ""))


class AblationFailed(ConfigError):
    """Variants of an ablation run failed; the report of what finished was still written."""

    def __init__(self, report: Report, failed: list[str]):
        self.report = report
        self.failed = failed
        super().__init__(f"{report.spec.name}: {len(failed)} variant(s) failed: {'; '.join(failed)}")


def select_variants(spec: AblationSpec, only: list[str] | None) -> list:
    """The spec's variants, or those named in ``only`` (in the spec's order); unknown names fail."""
    if not only:
        return list(spec.variants)
    known = [v.name for v in spec.variants]
    unknown = [n for n in only if n not in known]
    if unknown:
        raise ConfigError(f"{spec.name}: no variant {unknown[0]!r} (has: {', '.join(known)})")
    return [v for v in spec.variants if v.name in only]


def variant_overrides(variant) -> dict:
    """A variant's ``key=value`` overrides as ``{dotted key: value}`` (values parsed as YAML)."""
    import yaml

    return {item.split("=", 1)[0]: yaml.safe_load(item.split("=", 1)[1]) for item in variant.overrides}


def base_config(spec: AblationSpec, scale: ScaleSpec, train_shards: str, val_shards: str, uri: str, out: Path,
                overrides: list[str] | None = None):
    """The config every variant starts from: the scale's config, the table's and the scale's overrides,
    the user's ``--set`` ones, the data and the tracking store."""
    from pipelines.config import load_config

    items = [*spec.base_overrides, *scale.overrides, *(overrides or []),
             f"data.train_shards={train_shards}", f"data.val_shards={val_shards}",
             f"tracking.uri={uri}", f"tracking.experiment={spec.experiment}",
             f"run.storage_path={(Path(out) / 'runs').resolve()}"]
    try:
        return load_config(_repo_path(scale.config), items)
    except ConfigError as err:
        raise ConfigError(f"{spec.name}: {err}") from None


def variant_configs(spec: AblationSpec, scale: ScaleSpec, train_shards: str, val_shards: str, uri: str, out: Path,
                    overrides: list[str] | None = None, variants: list | None = None) -> dict:
    """The validated experiment config of every trained variant (errors name the table and variant)."""
    from lsnet.config import to_dict
    from pipelines.tune.space import trial_config

    base = to_dict(base_config(spec, scale, train_shards, val_shards, uri, out, overrides))
    configs = {}
    for v in variants if variants is not None else spec.variants:
        if v.kind != "train":
            continue
        try:
            configs[v.name] = trial_config(base, variant_overrides(v))
        except ConfigError as err:
            raise ConfigError(f"{spec.name} variant {v.name}: {err}") from None
    return configs


def _mask_upper_bound_child(spec: AblationSpec, v, mask_json: str | None, client, experiment_id: str,
                            parent_id: str, tags: dict) -> None:
    """§4.4 without training: GT masks quantised to ``num_points`` contour points, evaluated as predictions."""
    from mlflow.entities import Metric, Param

    from lsnet.mask_study import mask_study

    if mask_json is None:
        raise ConfigError(f"{spec.name} variant {v.name}: the dataset has no annotation JSON for the mask study")
    # the paper's protocol is N points per part of a multi-part object (its footnote; the authors'
    # sampler); N points in total (what our segm model outputs) and the largest part are logged beside it
    study = mask_study(mask_json, (v.num_points,), None)
    result = study["results"][f"per_part_{v.num_points}"]
    others = {f"mask_AP_{p}": float(study["results"][f"{p}_{v.num_points}"]["AP"]) for p in ("total", "largest")
              if f"{p}_{v.num_points}" in study["results"]}
    run = client.create_run(experiment_id, run_name=f"{spec.name}-{v.name}",
                            tags={**tags, "mlflow.parentRunId": parent_id, "lsnet.kind": "mask_study"})
    now = int(_dt.datetime.now(_dt.UTC).timestamp() * 1000)
    client.log_batch(run.info.run_id, metrics=[
        Metric(spec.metric, float(result["AP"]), now, 0), Metric("mask_mean_iou", float(result["mean_iou"]), now, 0),
        Metric("num_instances", float(study["num_instances"]), now, 0),
        *(Metric(k, value, now, 0) for k, value in others.items())],
        params=[Param("num_points", str(v.num_points)), Param("annotations", str(mask_json))])
    client.set_terminated(run.info.run_id, "FINISHED")


#: Figure 4 of the paper: per training step, one line per variant (the MLflow metric, its axis label)
CURVE_METRICS = (("pos_iou", "mean IoU of positive predictions"), ("loss_cls", "classification loss"))


def plot_curves(report: Report, tracking_uri: str, folder: Path) -> list[Path]:
    """Figure 4 as curves from MLflow: ``figure4_<metric>.png`` per metric of :data:`CURVE_METRICS`, one
    line per trained variant (its per-step history). Variants without the metric are left out."""
    from mlflow.tracking import MlflowClient

    from pipelines.plots import plot_series

    client = MlflowClient(tracking_uri)
    paths = []
    for metric, label in CURVE_METRICS:
        series = {}
        for row in report.rows:
            if row.run_id is None:
                continue
            history = client.get_metric_history(row.run_id, metric)
            if history:
                series[row.label] = [(m.step, m.value) for m in history]
        if series:
            paths.append(plot_series(series, folder / f"figure4_{metric}.png", xlabel="training step", ylabel=label,
                                     title=f"{report.spec.name} ({report.scale}): {label} per step"))
    return paths


# --------------------------------------------------------------------------------------------------
# Reading back + rendering
# --------------------------------------------------------------------------------------------------


@dataclass
class Row:
    name: str
    label: str
    paper: float | None
    ours: float | None  # in display units (percent for AP metrics)
    previous: float | None = None
    extras: dict[str, float] = field(default_factory=dict)
    paper_rank: int | None = None
    our_rank: int | None = None
    run_id: str | None = None


@dataclass
class Report:
    spec: AblationSpec
    scale: str
    experiment_id: str
    parent_run_id: str
    previous_run_id: str | None
    rows: list[Row]
    header: dict[str, str]
    regressions: list[str]
    ranking_notes: list[str]
    files: list[Path] = field(default_factory=list)

    def markdown(self) -> str:
        return render_markdown(self)

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        md, page = folder / "table.md", folder / "table.html"
        md.write_text(render_markdown(self))
        page.write_text(render_html(self))
        (folder / "table.json").write_text(json.dumps(
            {"table": self.spec.name, "scale": self.scale, "parent_run_id": self.parent_run_id,
             "previous_run_id": self.previous_run_id, "regressions": self.regressions,
             "rows": [r.__dict__ for r in self.rows]}, indent=1))
        self.files = [md, page, folder / "table.json"]
        return self.files


def _display(metric: str, value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value * 100 if metric.startswith(PERCENT_PREFIXES) else value


def _ranks(values: list[float | None], higher_is_better: bool) -> list[int | None]:
    present = sorted((v for v in values if v is not None), reverse=higher_is_better)
    return [None if v is None else present.index(v) + 1 for v in values]


def _children(client, experiment_ids: list[str], parent_id: str) -> dict[str, object]:
    runs = client.search_runs(experiment_ids, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=1000)
    return {r.data.tags.get("ablation_variant"): r for r in runs}


def find_parent_runs(client, experiment_id: str, table: str, scale: str) -> list:
    """Finished parent runs of ``table``/``scale``, newest first."""
    return client.search_runs(
        [experiment_id],
        filter_string=(f"tags.ablation_table = '{table}' and tags.ablation_scale = '{scale}' "
                       "and tags.ablation_kind = 'parent'"),
        order_by=["attributes.start_time DESC"], max_results=100)


def build_report(spec: AblationSpec, scale: str, tracking_uri: str, parent_id: str | None = None) -> Report:
    """Read the variants of a parent run (default: the latest finished one) back from MLflow."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(spec.experiment)
    if experiment is None:
        raise ConfigError(f"no MLflow experiment {spec.experiment!r} at {tracking_uri}")
    parents = find_parent_runs(client, experiment.experiment_id, spec.name, scale)
    if parent_id is None:
        finished = [r for r in parents if r.info.status == "FINISHED"]
        if not finished:
            raise ConfigError(f"no finished {spec.name}/{scale} ablation run in experiment {spec.experiment!r}")
        parent_id = finished[0].info.run_id
    parent = client.get_run(parent_id)
    # the previous *finished* run of the same table and scale on the same data and schedule (a spec edited
    # to another dataset starts a new series), started before this one
    same = {key: parent.data.tags.get(key) for key in ("dataset", "schedule")}
    previous = next((r for r in parents if r.info.status == "FINISHED" and r.info.run_id != parent_id
                     and r.info.start_time < parent.info.start_time
                     and all(r.data.tags.get(key) == value for key, value in same.items())), None)
    ours = _children(client, [experiment.experiment_id], parent_id)
    before = _children(client, [experiment.experiment_id], previous.info.run_id) if previous else {}
    listed = parent.data.tags.get("ablation_variants")  # a run of some variants (--variants) shows those
    shown = [v for v in spec.variants if not listed or v.name in listed.split(",")]
    rows = []
    for v in shown:
        run = ours.get(v.name)
        value = run.data.metrics.get(spec.metric) if run else None
        prev_run = before.get(v.name)
        prev = prev_run.data.metrics.get(spec.metric) if prev_run else None
        extras = {k: run.data.metrics[k] for k in EXTRA_METRICS if run and k in run.data.metrics}
        rows.append(Row(v.name, v.label or v.name, v.paper, _display(spec.metric, value),
                        _display(spec.metric, prev), extras, run_id=run.info.run_id if run else None))
    for row, rank in zip(rows, _ranks([r.paper for r in rows], spec.higher_is_better)):
        row.paper_rank = rank
    for row, rank in zip(rows, _ranks([r.ours for r in rows], spec.higher_is_better)):
        row.our_rank = rank
    tol = spec.tolerance * (100 if spec.metric.startswith(PERCENT_PREFIXES) else 1)
    regressions = []
    for row in rows:
        if row.ours is None:
            regressions.append(f"{row.name}: no {spec.metric} in this run")
            continue
        if row.previous is None:
            continue
        drop = (row.previous - row.ours) if spec.higher_is_better else (row.ours - row.previous)
        if drop > tol:
            regressions.append(f"{row.name}: {spec.metric} {row.ours:.2f} vs {row.previous:.2f} in the previous "
                               f"run (worse by {drop:.2f} > tolerance {tol:.2f})")
    ranking_notes = _ranking_notes(rows)
    if spec.scales[scale].check_paper_ranking and ranking_notes:
        regressions += [f"ranking: {n}" for n in ranking_notes]
    tags = parent.data.tags
    header = {"Table": spec.title, "Paper": spec.paper_source, "Scale": scale,
              "Dataset": tags.get("dataset", ""), "Schedule": tags.get("schedule", ""),
              "Backbone": tags.get("backbone", ""), "Metric": spec.metric,
              "Commit": tags.get("git_commit", ""), "MLflow parent run": parent_id,
              "Compared with": previous.info.run_id if previous else "(no previous finished run)"}
    return Report(spec, scale, experiment.experiment_id, parent_id, previous.info.run_id if previous else None,
                  rows, header, regressions, ranking_notes)


def _ranking_notes(rows: list[Row]) -> list[str]:
    """Pairs ordered one way by the paper and the other way by us."""
    notes = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if None in (a.paper_rank, b.paper_rank, a.our_rank, b.our_rank) or a.paper_rank == b.paper_rank:
                continue
            if (a.paper_rank < b.paper_rank) != (a.our_rank < b.our_rank):
                notes.append(f"paper ranks {a.name} {'above' if a.paper_rank < b.paper_rank else 'below'} {b.name}, "
                             "we do not")
    return notes


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _table_cells(report: Report) -> tuple[list[str], list[list[str]]]:
    columns = ["Variant", "Paper", "Ours", "Paper rank", "Our rank", "Previous run", "pos IoU (final)",
               "cls loss (final)"]
    digits = 1 if report.spec.metric.startswith(PERCENT_PREFIXES) else 3
    body = []
    for r in report.rows:
        body.append([r.label, _fmt(r.paper, 1), _fmt(r.ours, digits), _fmt(r.paper_rank, 0), _fmt(r.our_rank, 0),
                     _fmt(r.previous, digits), _fmt(r.extras.get("epoch_pos_iou"), 3),
                     _fmt(r.extras.get("epoch_loss_cls"), 3)])
    return columns, body


def _caveat(report: Report) -> str:
    if report.scale == "full":
        return "Full scale: the numbers are comparable with the paper's."
    return (f"Scale `{report.scale}`: absolute numbers are NOT comparable with the paper's (tiny data, short "
            "schedule, no pretraining); compare the rankings.")


def render_markdown(report: Report) -> str:
    lines = [f"# {report.spec.title} — {report.scale}", ""]
    lines += [f"- **{k}**: {v}" for k, v in report.header.items() if v]
    lines += ["", f"> {_caveat(report)}", ""]
    columns, body = _table_cells(report)
    lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    lines += ["", f"Paper ranking: {_ranking(report.rows, 'paper_rank', 'the paper gives no numbers for these rows')}",
              f"Our ranking: {_ranking(report.rows, 'our_rank', 'no variant has a number')}"]
    if report.ranking_notes:
        lines += ["", "Ranking differences:"] + [f"- {n}" for n in report.ranking_notes]
    lines += ["", f"## Regressions ({len(report.regressions)})"]
    lines += [f"- REGRESSION {r}" for r in report.regressions] or ["- none"]
    if report.spec.notes:
        lines += ["", report.spec.notes.strip()]
    return "\n".join(lines) + "\n"


def _ranking(rows: list[Row], attr: str, none: str) -> str:
    """Names of the ranked rows, best first (unranked rows are left out)."""
    ranked = sorted((r for r in rows if getattr(r, attr) is not None), key=lambda r: getattr(r, attr))
    return ", ".join(r.name for r in ranked) if ranked else f"— ({none})"


def render_html(report: Report) -> str:
    esc = html.escape
    columns, body = _table_cells(report)
    head = "".join(f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in report.header.items() if v)
    table = ("<table border=1 cellpadding=4><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>"
             + "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in body) + "</table>")
    regs = "".join(f"<li style='color:#b00'>REGRESSION {esc(r)}</li>" for r in report.regressions) or "<li>none</li>"
    notes = "".join(f"<li>{esc(n)}</li>" for n in report.ranking_notes)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(report.spec.title)}</title></head><body>"
            f"<h1>{esc(report.spec.title)} — {esc(report.scale)}</h1><ul>{head}</ul><p><i>{esc(_caveat(report))}</i></p>"
            f"{table}<h2>Ranking differences</h2><ul>{notes or '<li>none</li>'}</ul>"
            f"<h2>Regressions ({len(report.regressions)})</h2><ul>{regs}</ul></body></html>\n")
