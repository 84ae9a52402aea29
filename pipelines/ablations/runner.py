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
import json
import re
from pathlib import Path

from lsnet import storage
from lsnet.config import ConfigError
from pipelines.ablations.data import prepare_dataset, repo_path
from pipelines.ablations.report import Report, child_runs, mlflow_description, render_table
from pipelines.ablations.spec import AblationSpec, ScaleSpec


def run_ablation(spec: AblationSpec, scale_name: str, out: str | Path, tracking_uri: str | None = None,
                 overrides: list[str] | None = None, address: str | None = None, verbose: bool = True,
                 only: list[str] | None = None, resume: bool = False, seeds: int | None = None,
                 max_concurrent: int | None = None, publish: Path | None = None) -> Report:
    """Train the variants of ``spec`` at ``scale_name`` (``only``: a subset, by name) and render the table.

    The trained variants are Tune trials of :func:`pipelines.tune.trials.run_trials` (FIFO, each run to
    the end; as many at once as the Ray cluster holds), MLflow children of the table's parent run.
    Raises :class:`AblationFailed` (after rendering what there is) when a variant failed.

    ``resume``: continue the newest run of this table and scale under ``out`` that did not finish
    (killed, or a variant failed) with its own variants and overrides: finished variants are kept,
    the others continue from their last checkpoints, under the same parent run.

    ``out`` may be an object-store URI (``s3://bucket/ablations``): the driver then works on a local copy
    of it (pulled first, pushed at the end; the prepared shards pushed before training), the runs are
    stored at ``out/runs`` and the trials read the shards from ``out/data``.
    ``seeds``: K seeds per trained variant (default: the scale's ``seeds``); ``max_concurrent``: at most
    this many trials at once (default: what the cluster holds).
    ``publish``: also write the rendered table into ``publish/<table>-<scale>/`` (the committed reference
    tables; ``lsnet ablation run --publish``); the run's own output stays under ``out``.
    """
    from pipelines.train.rundir import NOT_MIRRORED

    scale = spec.scale(scale_name)
    out_copy = storage.MirroredDir(str(out), skip=NOT_MIRRORED)  # for a local `out`: the folder itself
    out_copy.pull()
    try:
        return _run_ablation(spec, scale, scale_name, out_copy, tracking_uri, overrides, address, verbose, only,
                             resume, seeds, max_concurrent, publish)
    finally:
        out_copy.push()


def _run_ablation(spec: AblationSpec, scale, scale_name: str, out_copy: storage.MirroredDir,
                  tracking_uri: str | None, overrides: list[str] | None, address: str | None, verbose: bool,
                  only: list[str] | None, resume: bool, seeds: int | None, max_concurrent: int | None,
                  publish: Path | None) -> Report:
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.store import ensure_experiment, open_store, resolve_tracking_uri
    from pipelines.tune.trials import open_parent_tracker

    out = out_copy.local
    if resume:  # the interrupted run's own choices, whatever this command line says
        name, saved = resumable_run(out / "runs", spec.name, scale_name)
        only, overrides, seeds = saved["variants"], saved["overrides"], saved.get("seeds", 1)
        if verbose:
            print(f"[ablation {spec.name}/{scale_name}] resuming {name}", flush=True)
    variants = select_variants(spec, only)
    seeds = seeds or scale.seeds
    if seeds < 1:
        raise ConfigError(f"{spec.name}: seeds must be >= 1, got {seeds}")
    uri = resolve_tracking_uri(tracking_uri)  # default: the checkout's shared store; the command's URI as is
    trained = [v for v in variants if v.kind == "train"]
    variant_configs(spec, scale, "/validate/train", "/validate/val", uri, out, overrides, trained)  # fail fast
    open_store(uri)  # prepared once, after the specs validate
    train_shards, val_shards, mask_json = prepare_dataset(spec, scale, out / "data")
    if out_copy.remote:  # the workers read the prepared shards from the store
        out_copy.push("data")
        train_shards, val_shards = (_stored(out_copy, p) for p in (train_shards, val_shards))
    base = base_config(spec, scale, train_shards, val_shards, uri, out_copy.location, overrides)
    if not resume:
        name = f"{spec.name}-{scale_name}-{_dt.datetime.now(_dt.UTC).strftime('%Y%m%d-%H%M%S')}"
    client = MlflowClient(uri)
    experiment_id = ensure_experiment(client, spec.experiment, uri)  # model training, artifacts beside the DB
    search_dir = out / "runs" / name  # (the local copy of) base.run.storage_path / name
    parent = open_parent_tracker(search_dir, uri, spec.experiment, name, verbose=False)
    common = {"ablation_table": spec.name, "ablation_scale": scale_name}
    if resume:
        parent.reopen()
    else:
        _start_parent_run(parent, spec, scale_name, base, variants, overrides, search_dir, common, seeds)
    if not parent.flush() or not parent.run_id:
        raise ConfigError(f"{spec.name}: cannot open the parent MLflow run at {uri}")
    try:
        failed = _train_variants(spec, scale_name, base, trained, name, search_dir, parent, common,
                                 address=address or scale.address, resume=resume, verbose=verbose,
                                 seeds=seeds, max_concurrent=max_concurrent)
        done = child_runs(client, [experiment_id], parent.run_id) if resume else {}
        for v in variants:
            if v.kind == "mask_upper_bound" and v.name not in done:
                _mask_upper_bound_child(spec, v, mask_json, client, experiment_id, parent.run_id,
                                        {**common, "ablation_variant": v.name})
        report = _publish_report(spec, scale_name, uri, parent, out, failed, experiment_id, publish)
    except BaseException as err:  # Ctrl-C / SIGTERM: KILLED (the trials too); `--resume` continues the table
        parent.close(interrupted_status(err))
        raise
    if failed:
        raise AblationFailed(report, failed)
    return report


def interrupted_status(err: BaseException) -> str:
    """The status of a parent run its command left by ``err``: KILLED for Ctrl-C or SIGTERM -- a
    KeyboardInterrupt, or the ``SystemExit(SIGTERM)`` of Ray's own handler when the signal lands while
    ``ray.init`` runs, before the search installs its Ctrl-C handler -- else FAILED."""
    import signal

    killed = isinstance(err, KeyboardInterrupt) or (isinstance(err, SystemExit) and err.code == signal.SIGTERM)
    return "KILLED" if killed else "FAILED"


def _start_parent_run(parent, spec: AblationSpec, scale_name: str, base, variants: list, overrides: list[str] | None,
                      search_dir: Path, common: dict[str, str], seeds: int = 1) -> None:
    """A new table run: what it was started with (``ablation.json``, for ``--resume``) and its tags."""
    from pipelines.provenance import commit_tags

    scale = spec.scale(scale_name)
    (search_dir / RUN_FILE).write_text(json.dumps(
        {"table": spec.name, "scale": scale_name, "variants": [v.name for v in variants],
         "overrides": list(overrides or []), "seeds": seeds}, indent=1))
    parent.set_tags({**commit_tags("lsnet ablation"), **common,
                     "ablation_kind": "parent", "dataset": scale.dataset_name, "schedule": scale.schedule,
                     "backbone": base.model.backbone, "ablation_variants": ",".join(v.name for v in variants),
                     "lsnet.kind": "ablation", "ablation_seeds": str(seeds),
                     # a --set changes the setting: the report shows it and compares only runs with the same
                     **({"ablation_overrides": " ".join(overrides)} if overrides else {})})


def _train_variants(spec: AblationSpec, scale_name: str, base, trained: list, name: str, search_dir: Path, parent,
                    common: dict[str, str], *, address: str | None, resume: bool, verbose: bool, seeds: int = 1,
                    max_concurrent: int | None = None) -> list[str]:
    """The trained variants x ``seeds`` seeds as Tune trials of one search (FIFO, children of ``parent``;
    seed ``i`` is ``train.seed = base seed + i``: model init and data order); returns ``variant (seed s):
    error`` of each trial that did not finish."""
    from pipelines.tune.records import SEARCH_FILE, SearchSettings, variant_key
    from pipelines.tune.trials import run_trials

    if not trained:
        return []
    seed_values = [base.train.seed + i for i in range(seeds)]
    if verbose:
        print(f"[ablation {spec.name}/{scale_name}] training {len(trained)} variant(s) x {seeds} seed(s): "
              f"{', '.join(v.name for v in trained)}", flush=True)
    settings = SearchSettings(name=name, metric=spec.metric, mode="max" if spec.higher_is_better else "min",
                              scheduler="fifo", search="grid", max_concurrent=max_concurrent)
    # seed-major order: with fewer slots than trials, every variant's first seed finishes first
    trials = [(v, seed) for seed in seed_values for v in trained]
    overrides_of = {(v.name, seed): {**variant_overrides(v), "train.seed": seed} for v, seed in trials}
    outcome = run_trials(
        base, list(overrides_of.values()), settings, address=address,
        verbose=verbose, source=f"{spec.name} ({scale_name})", parent=parent, source_name="lsnet ablation",
        # (a run killed before its trials started has no Tune state: they start now)
        resume=resume and (search_dir / SEARCH_FILE).exists(), retry_failed=True,
        # readable child names in MLflow (the Train run directories keep Tune's trial ids)
        variant_tags=[{**common, "ablation_variant": v.name, "ablation_seed": str(seed),
                       "mlflow.runName": f"{name}-{v.name}" + (f"-s{seed}" if seeds > 1 else "")}
                      for v, seed in trials])
    by_key = {variant_key(r.values): r for r in outcome.trials}
    failed = []
    for v, seed in trials:
        record = by_key.get(variant_key(overrides_of[(v.name, seed)]))
        if record is None or record.status != "FINISHED":
            which = f"{v.name} (seed {seed})" if seeds > 1 else v.name
            failed.append(f"{which}: {record.error if record else 'no trial ran'}")
    return failed


def _publish_report(spec: AblationSpec, scale_name: str, uri: str, parent, out: Path, failed: list[str],
                    experiment_id: str, publish: Path | None = None) -> Report:
    """Render the table from MLflow (as ``lsnet ablation render`` does), log it on the parent run (the table
    as the run page's Description, the regressions and failed variants as tags) and end the parent run."""
    parent.flush()  # the report reads the parent's tags back from MLflow
    report = render_table(spec, scale_name, uri, out, parent.run_id)
    if publish is not None and not failed:  # the committed reference table: only a complete run replaces it
        render_table(spec, scale_name, uri, publish, parent.run_id)
    for path in report.files:
        parent.log_artifact(path, "report")
    parent.set_tags({"mlflow.note.content": mlflow_description(report, experiment_id, parent.run_id),
                     "regressions": str(len(report.regressions)),
                     "regression_list": "; ".join(report.regressions)[:4000] or "none",
                     "failed_variants": "; ".join(failed)[:4000] or "none"})
    parent.close("FAILED" if failed else "FINISHED")
    return report


def run_tables(specs: list[AblationSpec], scale_name: str, out: Path, tracking_uri: str, overrides: list[str] | None,
               address: str | None, only: list[str] | None = None, resume: bool = False, **options):
    """:func:`run_ablation` of each table in turn, yielding ``(report, failure)`` as each ends (``failure``:
    the :class:`AblationFailed` line of a table whose variants did not all finish, else None). With
    ``resume`` a table with nothing to resume is skipped (a killed nightly job had finished it); none at all
    is an error."""
    skipped = 0
    for spec in specs:
        try:
            yield run_ablation(spec, scale_name, out, tracking_uri, overrides, address, only=only, resume=resume,
                               **options), None
        except AblationFailed as err:  # the table of what finished is still shown
            yield err.report, str(err)
        except NothingToResume as err:
            if len(specs) == 1:
                raise
            print(f"{err}: skipped", flush=True)
            skipped += 1
    if skipped == len(specs):
        raise ConfigError(f"--resume: none of {', '.join(s.name for s in specs)} has an unfinished run under {out}")


class NothingToResume(ConfigError):
    """``--resume`` found no unfinished run of the table (its newest run finished, or none exists)."""


#: what a run was started with (its variants and --set overrides), in its search directory: --resume reads it
RUN_FILE = "ablation.json"


def resumable_run(runs_dir: Path, table: str, scale: str) -> tuple[str, dict]:
    """``(name, saved)`` of the newest run of ``table``/``scale`` under ``runs_dir`` whose parent run did
    not finish; ConfigError when there is none."""
    from pipelines.tracking.journal import Journal
    from pipelines.tune.records import PARENT_DIRNAME

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


def _stored(out_copy: storage.MirroredDir, path: str) -> str:
    """Where a file of the local copy of ``out`` is stored (paths outside it are left as they are)."""
    try:
        return storage.join(out_copy.location, Path(path).resolve().relative_to(out_copy.local.resolve()).as_posix())
    except ValueError:
        return path


def base_config(spec: AblationSpec, scale: ScaleSpec, train_shards: str, val_shards: str, uri: str, out: str | Path,
                overrides: list[str] | None = None):
    """The config every variant starts from: the scale's config, the table's and the scale's overrides,
    the user's ``--set`` ones, the data and the tracking store."""
    from pipelines.config import load_config

    items = [*spec.base_overrides, *scale.overrides, *(overrides or []),
             f"data.train_shards={train_shards}", f"data.val_shards={val_shards}",
             f"tracking.uri={uri}", f"tracking.experiment={spec.experiment}",
             f"run.storage_path={storage.join(out, 'runs') if storage.is_uri(out) else (Path(out) / 'runs').resolve()}"]
    try:
        return load_config(repo_path(scale.config), items)
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


