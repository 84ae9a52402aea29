"""An ablation table read back from MLflow and rendered: the variants' final metrics beside the paper's,
both rankings, the regressions against the previous finished run, Markdown, HTML and Figure 4 curves.
``lsnet ablation render`` is this module alone; ``lsnet ablation run`` ends with it.

With K seeds per variant (children tagged ``ablation_seed``) a row is the mean ± 95 % t interval over
its seeds, every seed's value in the JSON and on hover in the HTML; each pair the paper ranks is marked
reproduced / opposite / unresolved by a paired t-test across seeds; regressions and the Figure 4 claim
use the same noise (:mod:`pipelines.ablations.stats`)."""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from lsnet.config import ConfigError
from pipelines.ablations import stats
from pipelines.ablations.spec import AblationSpec

#: metrics shown as percentages (the paper's unit)
PERCENT_PREFIXES = ("bbox_AP", "segm_AP", "kp_AP", "mask_AP")


#: per-variant extras read from the child runs (Figure 4: final mean IoU of positives, classification loss)
EXTRA_METRICS = ("epoch_pos_iou", "epoch_loss_cls")


#: Figure 4 of the paper: per training step, one line per variant (the MLflow metric, its axis label)
CURVE_METRICS = (("pos_iou", "mean IoU of positive predictions"), ("loss_cls", "classification loss"))


def read_curves(report: Report, tracking_uri: str) -> dict[str, dict[str, dict[int, list[float]]]]:
    """``{metric: {variant: {seed: per-step values}}}`` of :data:`CURVE_METRICS` from the children's MLflow
    histories (steps in order); variants or seeds without the metric are left out."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    curves: dict[str, dict[str, dict[int, list[float]]]] = {}
    for metric, _label in CURVE_METRICS:
        for row in report.rows:
            for seed, run_id in row.run_ids.items():
                history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, metric))
                if history:
                    curves.setdefault(metric, {}).setdefault(row.name, {})[seed] = [v for _, v in history]
    return curves


def plot_curves(report: Report, tracking_uri: str, folder: Path) -> list[Path]:
    """Figure 4 as curves from MLflow: ``figure4_<metric>.png`` per metric of :data:`CURVE_METRICS`, one
    line per trained variant: each seed's per-step series smoothed (trailing mean of
    :data:`stats.SMOOTH_WINDOW` steps), the mean over seeds, and a band of its 95 % t interval."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = report.curves if report.curves is not None else read_curves(report, tracking_uri)
    labels = {r.name: r.label for r in report.rows}
    paths = []
    for metric, label in CURVE_METRICS:
        by_variant = curves.get(metric)
        if not by_variant:
            continue
        fig, ax = plt.subplots(figsize=(6.4, 4), dpi=100)
        for name, by_seed in by_variant.items():
            mean, low, high = stats.mean_band([stats.smooth(v) for v in by_seed.values()])
            steps = range(1, len(mean) + 1)
            line, = ax.plot(steps, mean, label=f"{labels.get(name, name)} (K={len(by_seed)})")
            if len(by_seed) > 1:
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xlabel("training step")
        ax.set_ylabel(label)
        ax.set_title(f"{report.spec.name} ({report.scale}): mean over seeds ± 95 % t band,\n"
                     f"each seed smoothed by a trailing mean of {stats.SMOOTH_WINDOW} steps", fontsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
        fig.tight_layout()
        path = folder / f"figure4_{metric}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


@dataclass
class Row:
    name: str
    label: str
    paper: float | None
    ours: float | None  # in display units (percent for AP metrics): the mean over seeds
    previous: float | None = None  # the previous run's mean
    extras: dict[str, float] = field(default_factory=dict)  # means over seeds
    paper_rank: int | None = None
    our_rank: int | None = None
    run_id: str | None = None  # the first seed's child run
    #: seed -> value (display units), seed -> child run id; the previous run's values
    values: dict[int, float] = field(default_factory=dict)
    run_ids: dict[int, str] = field(default_factory=dict)
    previous_values: dict[int, float] = field(default_factory=dict)
    interval: float | None = None  # half width of the 95 % t interval of ``ours`` (None: one seed)


@dataclass
class Pair:
    """A pair of variants the paper ranks (``better`` above ``worse``) and what our seeds say."""

    better: str
    worse: str
    mean_diff: float | None  # ours: mean over shared seeds of better - worse (display units)
    n: int
    p: float | None
    verdict: str  # reproduced / opposite / unresolved
    #: unresolved: the seeds that would resolve it at the observed difference and spread (a projection)
    seeds_needed: int | None = None
    #: measured on these runs: the fewest first seeds from which the pair stays resolved (None: not
    #: resolved), and the paired test's p on the first k seeds for each k >= 2 (stats.resolved_from)
    resolved_from: int | None = None
    p_by_seeds: dict[int, float] = field(default_factory=dict)

    def describe(self, unit: str = "", digits: int = 2) -> str:
        if self.mean_diff is None:
            return f"{self.better} vs {self.worse}: **unresolved** (no shared seeds)"
        test = f"p {_p(self.p)}" if self.p is not None else "one seed: no test"
        seeds = f"{self.n} seed" + ("s" if self.n != 1 else "")
        return (f"{self.better} − {self.worse} = {self.mean_diff:+.{digits}f}{unit} over {seeds} ({test}): "
                + {"reproduced": "resolved, the paper's direction: **reproduced**",
                   "opposite": "resolved, **opposite** to the paper",
                   "unresolved": "**unresolved** at this scale"}[self.verdict]
                + (f" (at this difference and spread ~{self.seeds_needed} seeds would resolve it)"
                   if self.verdict == "unresolved" and self.seeds_needed and self.seeds_needed > self.n else "")
                + (f"; resolved from the first {self.resolved_from} seeds on"
                   if self.resolved_from is not None and self.resolved_from < self.n else "")
                + (f"; p on the first k seeds: {self._p_by_seeds()}" if max(self.p_by_seeds, default=0) >= 4 else ""))

    def _p_by_seeds(self) -> str:
        return ", ".join(f"k={k}: p {_p(p)}" for k, p in sorted(self.p_by_seeds.items()) if k >= 3)


def _p(p: float) -> str:
    """``= 0.041``, or ``< 0.001`` where three decimals would print a misleading 0.000."""
    return f"= {p:.3f}" if p >= 0.001 else "< 0.001"


@dataclass
class CurveClaim:
    """The paper's Figure 4 claim read by a number: area per step under the ``metric`` curve of each
    variant (one value per seed, mean ± interval) and the paired test of ``variant`` against each other."""

    metric: str
    variant: str
    areas: dict[str, dict[int, float]]
    pairs: list[Pair]


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
    pairs: list[Pair] = field(default_factory=list)
    seeds: int = 1  # the most seeds of any row
    noise_note: str = ""  # K = 1: cannot tell noise from a regression
    curves: dict | None = None  # read_curves(), when read
    curve_claim: CurveClaim | None = None

    def markdown(self) -> str:
        return render_markdown(self)

    def write(self, folder: Path) -> list[Path]:
        folder.mkdir(parents=True, exist_ok=True)
        md, page = folder / "table.md", folder / "table.html"
        md.write_text(render_markdown(self))
        page.write_text(render_html(self))
        claim = self.curve_claim
        (folder / "table.json").write_text(json.dumps(
            {"table": self.spec.name, "scale": self.scale, "parent_run_id": self.parent_run_id,
             "previous_run_id": self.previous_run_id, "regressions": self.regressions,
             "seeds": self.seeds, "interval": f"{stats.LEVEL:.0%} Student-t interval of the mean over seeds",
             "pair_test": f"paired t-test across seeds, two-sided, level {1 - stats.LEVEL:.2f}",
             "rows": [r.__dict__ for r in self.rows], "pairs": [p.__dict__ for p in self.pairs],
             "figure4": None if claim is None else {
                 "metric": claim.metric, "number": "area under the curve per step (mean over training steps)",
                 "smoothing_window_steps": stats.SMOOTH_WINDOW, "variant": claim.variant,
                 "areas": claim.areas, "pairs": [p.__dict__ for p in claim.pairs]}}, indent=1, default=str))
        self.files = [md, page, folder / "table.json"]
        return self.files


def mlflow_description(report: Report, experiment_id: str, run_id: str, limit: int = 7500) -> str:
    """The parent run's Description (``mlflow.note.content``): the results table first -- MLflow's run page
    folds a long description under "Show more" after a few lines, so the rows come before the settings --
    then links to the Figure 4 plots (logged under ``report/``) and the whole report. Cut at ``limit``
    characters (MLflow's tag limit is 8000)."""
    table = [line for line in render_markdown(report).splitlines() if line.startswith("|")]
    lines = [f"**{report.spec.title} — {report.scale}**, {report.spec.metric}, K = {report.seeds} seed(s)", "",
             *table]
    plots = [p.name for p in report.files if p.suffix == ".png"]
    if plots:
        lines += ["", "Figure 4: " + " · ".join(
            f"[{name}](#/experiments/{experiment_id}/runs/{run_id}/artifactPath/report/{name})" for name in plots)]
    return ("\n".join(lines) + "\n\n---\n\n" + render_markdown(report))[:limit]


def _display(metric: str, value: float | None) -> float | None:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value * 100 if metric.startswith(PERCENT_PREFIXES) else value


def _ranks(values: list[float | None], higher_is_better: bool) -> list[int | None]:
    present = sorted((v for v in values if v is not None), reverse=higher_is_better)
    return [None if v is None else present.index(v) + 1 for v in values]


def child_runs(client, experiment_ids: list[str], parent_id: str) -> dict[str, dict[int, object]]:
    """``{variant: {seed: child run}}`` of a parent run (a child without ``ablation_seed``: seed 0)."""
    runs = client.search_runs(experiment_ids, filter_string=f"tags.mlflow.parentRunId = '{parent_id}'",
                              max_results=5000)
    out: dict[str, dict[int, object]] = {}
    for r in runs:
        seed = int(r.data.tags.get("ablation_seed", 0))
        out.setdefault(r.data.tags.get("ablation_variant"), {})[seed] = r
    return {k: dict(sorted(v.items())) for k, v in out.items()}


def render_table(spec: AblationSpec, scale: str, tracking_uri: str, out: Path, parent_id: str | None = None) -> Report:
    """``lsnet ablation render``: the report of a parent run (default: the latest finished one) rebuilt from
    MLflow alone and written to ``<out>/<table>-<scale>/`` with its Figure 4 curves."""
    report = build_report(spec, scale, tracking_uri, parent_id, with_curves=True)
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


def build_report(spec: AblationSpec, scale: str, tracking_uri: str, parent_id: str | None = None,
                 with_curves: bool = True) -> Report:
    """Read the variants of a parent run (default: the latest finished one) back from MLflow;
    ``with_curves``: also the per-step curves and the Figure 4 claim read from them."""
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
    # the previous *finished* run of the same table and scale on the same data, schedule and --set overrides
    # (a spec edited to another dataset, or a run with other overrides, starts a new series), started before
    # this one
    same = {key: parent.data.tags.get(key) for key in ("dataset", "schedule", "ablation_overrides")}
    previous = next((r for r in parents if r.info.status == "FINISHED" and r.info.run_id != parent_id
                     and r.info.start_time < parent.info.start_time
                     and all(r.data.tags.get(key) == value for key, value in same.items())), None)
    ours = child_runs(client, [experiment.experiment_id], parent_id)
    before = child_runs(client, [experiment.experiment_id], previous.info.run_id) if previous else {}
    listed = parent.data.tags.get("ablation_variants")  # a run of some variants (--variants) shows those
    shown = [v for v in spec.variants if not listed or v.name in listed.split(",")]
    rows = []
    for v in shown:
        runs = ours.get(v.name, {})
        values = {seed: _display(spec.metric, r.data.metrics.get(spec.metric)) for seed, r in runs.items()}
        values = {seed: x for seed, x in values.items() if x is not None}
        prev = {seed: _display(spec.metric, r.data.metrics.get(spec.metric)) for seed, r in before.get(v.name, {}).items()}
        prev = {seed: x for seed, x in prev.items() if x is not None}
        iv, prev_iv = stats.t_interval(list(values.values())), stats.t_interval(list(prev.values()))
        extras = {}
        for k in EXTRA_METRICS:
            got = [r.data.metrics[k] for r in runs.values() if k in r.data.metrics]
            if got:
                extras[k] = sum(got) / len(got)
        rows.append(Row(v.name, v.label or v.name, v.paper, iv.mean if iv else None,
                        prev_iv.mean if prev_iv else None, extras,
                        run_id=next(iter(runs.values())).info.run_id if runs else None, values=values,
                        run_ids={seed: r.info.run_id for seed, r in runs.items()}, previous_values=prev,
                        interval=iv.half_width if iv else None))
    for row, rank in zip(rows, _ranks([r.paper for r in rows], spec.higher_is_better)):
        row.paper_rank = rank
    for row, rank in zip(rows, _ranks([r.ours for r in rows], spec.higher_is_better)):
        row.our_rank = rank
    regressions = _regressions(spec, rows)
    pairs = paper_pairs(rows, spec.higher_is_better, spec.paper_claims)
    ranking_notes = _ranking_notes(rows, pairs)
    if spec.scales[scale].check_paper_ranking and ranking_notes:  # with seeds: only orders outside the noise
        regressions += [f"ranking: {n}" for n in ranking_notes if "(unresolved" not in n]
    seeds = max((len(r.values) for r in rows), default=0)
    noise_note = ""
    if before and any(len(r.values) < 2 or len(r.previous_values) < 2 for r in rows if r.previous_values):
        noise_note = ("K = 1 (this run or the previous one has one seed per variant): it cannot tell noise from "
                      "a regression; drops beyond the spec's fixed tolerance are flagged instead")
    tags = parent.data.tags
    header = {"Table": spec.title, "Paper": spec.paper_source, "Scale": scale,
              "Seeds": f"K = {seeds} per variant (train.seed 0..K-1: model init and data order)" if seeds else "",
              "Dataset": tags.get("dataset", ""), "Schedule": tags.get("schedule", ""),
              "Overrides": (f"`{tags['ablation_overrides']}` (--set, over the scale's settings above)"
                            if tags.get("ablation_overrides") else ""),
              "Backbone": tags.get("backbone", ""), "Metric": spec.metric,
              "Cost": cost(parent, [r for by_seed in ours.values() for r in by_seed.values()]),
              "Commit": tags.get("git_commit", ""), "MLflow parent run": parent_id,
              "Compared with": previous.info.run_id if previous else "(no previous finished run)"}
    report = Report(spec, scale, experiment.experiment_id, parent_id, previous.info.run_id if previous else None,
                    rows, header, regressions, ranking_notes, pairs=pairs, seeds=seeds, noise_note=noise_note)
    if with_curves:
        report.curves = read_curves(report, tracking_uri)
        report.curve_claim = curve_claim(spec, report.curves)
    return report


def cost(parent, children: list) -> str:
    """What the run cost, from MLflow's start/end times: trials (child runs), their summed minutes (each
    trial is one training run; a 1-CPU worker at the tiny and signal scales), and the wall time from the
    parent's start to the last trial's end (how many trials ran at once decides the ratio; after a
    ``--resume`` it includes the pause, and a trial counts its last attempt only)."""
    ended = [r for r in children if r.info.end_time and r.info.start_time
             and r.data.tags.get("lsnet.kind") != "mask_study"]  # the §4.4 upper bounds train nothing
    if not ended:
        return ""
    trial_min = sum(r.info.end_time - r.info.start_time for r in ended) / 60_000
    wall_min = (max(r.info.end_time for r in ended) - parent.info.start_time) / 60_000
    return (f"{len(ended)} trials, {trial_min:.1f} trial-minutes ({trial_min / len(ended):.1f} min each), "
            f"{wall_min:.1f} min wall from the parent run's start to the last trial's end")


def paper_pairs(rows: list[Row], higher_is_better: bool, claims: list[list[str]] = ()) -> list[Pair]:
    """Every pair of rows the paper ranks (both have paper numbers, not equal; or stated in ``claims`` as
    ``[better, worse]``), better first, with the paired t-test of our seeds."""
    by_name = {r.name: r for r in rows}
    pairs = [_pair(better, by_name[better].values, worse, by_name[worse].values, higher_is_better)
             for better, worse in claims if better in by_name and worse in by_name]
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if a.paper is None or b.paper is None or a.paper == b.paper:
                continue
            better, worse = (a, b) if (a.paper > b.paper) == higher_is_better else (b, a)
            pairs.append(_pair(better.name, better.values, worse.name, worse.values, higher_is_better))
    return pairs


def _pair(better: str, a: dict[int, float], worse: str, b: dict[int, float], higher_is_better: bool) -> Pair:
    test = stats.paired_test(a, b)
    first, p_by_seeds = stats.resolved_from(a, b)
    return Pair(better, worse, test.mean_diff if test else None, test.n if test else 0,
                test.p if test else None, stats.pair_verdict(test, True, higher_is_better),
                stats.seeds_to_resolve(a, b), first, p_by_seeds)


def curve_claim(spec: AblationSpec, curves: dict) -> CurveClaim | None:
    """The spec's Figure 4 claim (``curve_claim``) read from the curves: area per step of each variant's
    ``metric`` per seed, and the claimed variant against every other by a paired t-test."""
    claim = spec.curve_claim
    if claim is None or claim.metric not in curves or claim.variant not in curves[claim.metric]:
        return None
    areas = {name: {seed: stats.area_per_step(values) for seed, values in by_seed.items()}
             for name, by_seed in curves[claim.metric].items()}
    pairs = [_pair(claim.variant, areas[claim.variant], name, areas[name], claim.higher_is_better)
             for name in areas if name != claim.variant]
    return CurveClaim(claim.metric, claim.variant, areas, pairs)


def _regressions(spec: AblationSpec, rows: list[Row]) -> list[str]:
    """Each variant without the metric, or whose mean falls below the previous run's 95 % interval (with
    one seed on either side: worse than the previous run by more than the spec's tolerance)."""
    tol = spec.tolerance * (100 if spec.metric.startswith(PERCENT_PREFIXES) else 1)
    regressions = []
    for row in rows:
        if row.ours is None:
            regressions.append(f"{row.name}: no {spec.metric} in this run")
            continue
        if not row.previous_values:
            continue
        regressed, why = stats.regression(list(row.values.values()), list(row.previous_values.values()),
                                          spec.higher_is_better, tol)
        if regressed:
            regressions.append(f"{row.name}: {spec.metric} {why}")
    return regressions


def _ranking_notes(rows: list[Row], pairs: list[Pair] | None = None) -> list[str]:
    """Pairs ordered one way by the paper and the other way by our means (with seeds: whether resolved)."""
    verdicts = {(p.better, p.worse): p.verdict for p in pairs or []}
    notes = []
    for i, a in enumerate(rows):
        for b in rows[i + 1:]:
            if None in (a.paper_rank, b.paper_rank, a.our_rank, b.our_rank) or a.paper_rank == b.paper_rank:
                continue
            if (a.paper_rank < b.paper_rank) != (a.our_rank < b.our_rank):
                verdict = verdicts.get((a.name, b.name)) or verdicts.get((b.name, a.name))
                suffix = {"opposite": " (resolved)", "unresolved": " (unresolved: within the noise)"}.get(verdict, "")
                if len(a.values) < 2:
                    suffix = ""
                notes.append(f"paper ranks {a.name} {'above' if a.paper_rank < b.paper_rank else 'below'} {b.name}, "
                             f"we do not{suffix}")
    return notes


def _fmt(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ours(row: Row, digits: int) -> str:
    if row.ours is None:
        return "—"
    return _fmt(row.ours, digits) + (f" ± {row.interval:.{digits}f}" if row.interval is not None else "")


def _seed_values(row: Row, digits: int) -> str:
    return ", ".join(f"seed {seed}: {value:.{digits}f}" for seed, value in row.values.items())


def _table_cells(report: Report) -> tuple[list[str], list[list[str]]]:
    many = report.seeds > 1
    columns = ["Variant", "Paper", f"Ours (mean ± 95 % CI, K={report.seeds})" if many else "Ours", "Paper rank",
               "Our rank", "Previous run", "pos IoU (final)", "cls loss (final)"]
    digits = 1 if report.spec.metric.startswith(PERCENT_PREFIXES) else 3
    body = []
    for r in report.rows:
        body.append([r.label, _fmt(r.paper, 1), _ours(r, digits), _fmt(r.paper_rank, 0), _fmt(r.our_rank, 0),
                     _fmt(r.previous, digits), _fmt(r.extras.get("epoch_pos_iou"), 3),
                     _fmt(r.extras.get("epoch_loss_cls"), 3)])
    return columns, body


def _statistics_lines(report: Report) -> list[str]:
    """The paper's pairs with their verdicts, the Figure 4 claim, the noise note (Markdown lines)."""
    unit = " AP" if report.spec.metric.startswith(PERCENT_PREFIXES) else ""
    lines = []
    if report.seeds > 1:
        digits = 1 if unit else 3
        lines += ["", f"Per seed ({report.spec.metric}):"]
        lines += [f"- {r.name}: {_seed_values(r, digits)}" for r in report.rows if r.values]
    if report.pairs:
        done = sum(p.verdict == "reproduced" for p in report.pairs)
        lines += ["", f"## The paper's pairs ({done} of {len(report.pairs)} reproduced)", "",
                  ("Paired t-test across seeds (seed i of both variants shares the data order and the initial "
                  f"weights), two-sided, level {1 - stats.LEVEL:.2f}; reproduced = resolved in the paper's "
                  "direction.")]
        lines += [f"- {p.describe(unit)}" for p in report.pairs]
    claim = report.curve_claim
    if claim is not None:
        lines += ["", f"## Figure 4: {claim.metric}, area under the curve per step", "",
                  (f"The paper's claim: {claim.variant}'s {claim.metric} rises faster. Number: the mean of the raw "
                  f"per-step {claim.metric} over training (area under the curve / steps), per seed; curves drawn "
                  f"with a trailing mean of {stats.SMOOTH_WINDOW} steps, band = 95 % t interval over seeds.")]
        for name, by_seed in claim.areas.items():
            iv = stats.t_interval(list(by_seed.values()))
            half = f" ± {iv.half_width:.4f}" if iv.half_width is not None else ""
            lines.append(f"- {name}: {iv.mean:.4f}{half} (seeds: {', '.join(f'{v:.4f}' for v in by_seed.values())})")
        lines += [f"- {p.describe(digits=4)}" for p in claim.pairs]
    if report.noise_note:
        lines += ["", f"> {report.noise_note}"]
    return lines


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
    lines += _statistics_lines(report)
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
    import re

    esc = html.escape
    columns, body = _table_cells(report)
    digits = 1 if report.spec.metric.startswith(PERCENT_PREFIXES) else 3
    head = "".join(f"<li><b>{esc(k)}</b>: {esc(str(v))}</li>" for k, v in report.header.items() if v)
    cells = []
    for row, cells_of_row in zip(report.rows, body):
        hover = _seed_values(row, digits)  # every seed's value on hover over "Ours"
        cells.append("<tr>" + "".join(
            f"<td title='{esc(hover)}'><u>{esc(c)}</u></td>" if i == 2 and hover else f"<td>{esc(c)}</td>"
            for i, c in enumerate(cells_of_row)) + "</tr>")
    table = ("<table border=1 cellpadding=4><tr>" + "".join(f"<th>{esc(c)}</th>" for c in columns) + "</tr>"
             + "".join(cells) + "</table>")
    regs = "".join(f"<li style='color:#b00'>REGRESSION {esc(r)}</li>" for r in report.regressions) or "<li>none</li>"
    notes = "".join(f"<li>{esc(n)}</li>" for n in report.ranking_notes)
    colour = {"reproduced": "#070", "opposite": "#b00", "unresolved": "#666"}
    stats_html = []
    for line in _statistics_lines(report):
        if line.startswith("## "):
            stats_html.append(f"<h2>{esc(line[3:])}</h2>")
        elif line.startswith("- "):
            text = esc(line[2:])
            text = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", text)
            verdict = next((v for v in colour if v in line), None)
            style = f" style='color:{colour[verdict]}'" if verdict and "=" in line else ""
            stats_html.append(f"<li{style}>{text}</li>")
        elif line.startswith("> "):
            stats_html.append(f"<p><i>{esc(line[2:])}</i></p>")
        elif line:
            stats_html.append(f"<p>{esc(line)}</p>")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(report.spec.title)}</title></head><body>"
            f"<h1>{esc(report.spec.title)} — {esc(report.scale)}</h1><ul>{head}</ul><p><i>{esc(_caveat(report))}</i></p>"
            f"{table}<p>Hover over a value of ours for every seed's.</p>"
            f"<h2>Ranking differences</h2><ul>{notes or '<li>none</li>'}</ul>{''.join(stats_html)}"
            f"<h2>Regressions ({len(report.regressions)})</h2><ul>{regs}</ul></body></html>\n")
