"""An ablation table read back from MLflow and rendered: the variants' final metrics beside the paper's,
both rankings, the regressions against the previous finished run, Markdown, HTML and Figure 4 curves.
``lsnet ablation render`` is this module alone; ``lsnet ablation run`` ends with it."""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lsnet.config import ConfigError
from pipelines.ablations.spec import AblationSpec

#: metrics shown as percentages (the paper's unit)
PERCENT_PREFIXES = ("bbox_AP", "segm_AP", "kp_AP", "mask_AP")


#: per-variant extras read from the child runs (Figure 4: final mean IoU of positives, classification loss)
EXTRA_METRICS = ("epoch_pos_iou", "epoch_loss_cls")


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


def child_runs(client, experiment_ids: list[str], parent_id: str) -> dict[str, object]:
    runs = client.search_runs(experiment_ids, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=1000)
    return {r.data.tags.get("ablation_variant"): r for r in runs}


def render_table(spec: AblationSpec, scale: str, tracking_uri: str, out: Path, parent_id: str | None = None) -> Report:
    """``lsnet ablation render``: the report of a parent run (default: the latest finished one) rebuilt from
    MLflow alone and written to ``<out>/<table>-<scale>/`` with its Figure 4 curves."""
    report = build_report(spec, scale, tracking_uri, parent_id)
    folder = Path(out) / f"{spec.name}-{scale}"
    report.write(folder)
    report.files += plot_curves(report, tracking_uri, folder)
    return report


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
    ours = child_runs(client, [experiment.experiment_id], parent_id)
    before = child_runs(client, [experiment.experiment_id], previous.info.run_id) if previous else {}
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
    regressions = _regressions(spec, rows)
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


def _regressions(spec: AblationSpec, rows: list[Row]) -> list[str]:
    """Each variant without the metric, or worse than in the previous run by more than the tolerance."""
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
    return regressions


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
