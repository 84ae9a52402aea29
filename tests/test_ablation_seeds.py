"""Ablation tables with K seeds (issue 22 §1) and user runs that never touch committed files (issue 23 item 4).

- the statistics against hand-computed values: the t interval, the paired t-test, the smoothing, the
  noise-based regression rule and its K = 1 fallback;
- a report of seeded parent runs (MLflow runs made by hand, no training): a variant planted worse than
  the previous run by more than the noise is flagged, one that differs only by its seeds is not; every
  seed's value is in the JSON and on hover in the HTML; the paper's pairs are marked reproduced /
  opposite / unresolved;
- one tiny run with 2 seeds end to end (2 variants x 2 seeds, 1 epoch of 4 steps) from the checkout's
  root with the default --out: the committed tables' git status is unchanged, the children carry
  ``ablation_seed``, the table gives an interval.
"""
from __future__ import annotations

import json
import math
import subprocess
from pathlib import Path

import pytest

from pipelines.ablations import stats
from pipelines.ablations.spec import load_ablation_spec

_clock = iter(range(1_700_000_000_000, 1_800_000_000_000, 60_000))


# ----------------------------------------------------------------------------------------------
# Statistics (hand-computed)
# ----------------------------------------------------------------------------------------------


def test_t_interval_and_paired_test_against_hand_values():
    iv = stats.t_interval([1.0, 2.0, 3.0])  # mean 2, s = 1, t(0.975, 2) = 4.302653
    assert iv.mean == pytest.approx(2.0) and iv.half_width == pytest.approx(4.302653 / math.sqrt(3), rel=1e-5)
    assert stats.t_interval([5.0]).half_width is None and stats.t_interval([]) is None
    # differences 1, 2, 3: mean 2, s 1, t = 2 / (1 / sqrt 3) = 3.4641, two-sided p(df 2) = 0.07418
    test = stats.paired_test({0: 11.0, 1: 12.0, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert test.t == pytest.approx(3.4641, rel=1e-4) and test.p == pytest.approx(0.07418, rel=1e-3)
    assert not test.resolved()  # p > 0.05 at K = 3
    # only shared seeds are paired: differences 2, 2.1, 1.9 -> t = 2 / (0.1 / sqrt 3) = 34.64, p = 0.00083
    test = stats.paired_test({0: 12.0, 1: 12.1, 2: 11.9, 7: 0.0}, {0: 10.0, 1: 10.0, 2: 10.0, 9: 0.0})
    assert test.n == 3 and test.p == pytest.approx(0.000832, rel=1e-2) and test.resolved()
    assert stats.pair_verdict(test, True, True) == "reproduced"
    assert stats.pair_verdict(test, False, True) == "opposite"
    assert stats.pair_verdict(test, True, False) == "opposite"  # lower is better: a is worse
    assert stats.paired_test({0: 1.0}, {0: 0.0}).p is None  # one seed: no test
    assert stats.pair_verdict(stats.paired_test({0: 1.0}, {0: 0.0}), True, True) == "unresolved"
    same = stats.paired_test({0: 2.0, 1: 3.0}, {0: 1.0, 1: 2.0})  # bit-reproducible runs: zero spread
    assert same.p == 0.0 and same.resolved()
    # differences 1, 2, 3 (mean 2, s 1): K=3 gives 4.30/1.73 = 2.48 > 2, K=4 gives 3.18/2 = 1.59 < 2
    assert stats.seeds_to_resolve({0: 11.0, 1: 12.0, 2: 13.0}, {0: 10.0, 1: 10.0, 2: 10.0}) == 4
    assert stats.seeds_to_resolve({0: 1.0}, {0: 0.0}) is None


def test_resolved_from_reads_the_cheapest_seed_count_from_the_runs():
    # differences over seeds 0..4: 1, 2, 3, 2, 2
    a, b = {0: 11.0, 1: 12.0, 2: 13.0, 3: 12.0, 4: 12.0}, {s: 10.0 for s in range(5)}
    first, p = stats.resolved_from(a, b)
    # k=2: diffs 1, 2 (mean 1.5, s 0.7071, t 3.0, df 1): p = 0.2048; k=3: 0.07418 (above);
    # k=4: diffs 1,2,3,2 (mean 2, s 0.8165, t 4.899, df 3): p = 0.01628; k=5: mean 2, s 0.7071, t 6.325: p 0.0032
    assert sorted(p) == [2, 3, 4, 5]
    assert p[2] == pytest.approx(0.2048, rel=1e-3) and p[3] == pytest.approx(0.07418, rel=1e-3)
    assert p[4] == pytest.approx(0.01628, rel=1e-2) and p[5] == pytest.approx(0.00320, rel=2e-2)
    assert first == 4
    from pipelines.ablations.report import Pair  # how a report prints it (K >= 4: p per first-k seeds)

    assert Pair("a", "b", 2.0, 5, 0.0004, "reproduced", None, first, p).describe(" AP") == (
        "a − b = +2.00 AP over 5 seeds (p < 0.001): resolved, the paper's direction: **reproduced**; resolved "
        "from the first 4 seeds on; p on the first k seeds: k=3: p = 0.074, k=4: p = 0.016, k=5: p = 0.003")
    # resolved at k=2 by chance (zero spread), unresolved at 3, resolved again at 4, 5: stays resolved from 4
    first, _ = stats.resolved_from({0: 12.0, 1: 12.0, 2: 10.5, 3: 12.0, 4: 12.0}, {s: 10.0 for s in range(5)})
    assert first == 4
    first, p = stats.resolved_from({0: 9.0, 1: 9.0, 2: 9.0}, {0: 10.0, 1: 10.0, 2: 10.0})
    assert first == 2 and p == {2: 0.0, 3: 0.0}  # diffs -1, -1, -1: zero spread, resolved (below) from 2 seeds
    assert stats.resolved_from(a, {s: v for s, v in a.items()}) == (None, {2: 1.0, 3: 1.0, 4: 1.0, 5: 1.0})
    assert stats.resolved_from({0: 1.0}, {0: 0.0}) == (None, {})


def test_smoothing_and_band():
    assert stats.smooth([1, 2, 3, 4, 5], window=2) == [1, 1.5, 2.5, 3.5, 4.5]
    assert stats.smooth([4, 0, 2], window=25) == [4, 2, 2]
    mean, low, high = stats.mean_band([[1.0, 2.0, 9.0], [3.0, 4.0]])  # cut to the shortest
    # two series: s = sqrt(2) at each step, t(0.975, 1) = 12.706205: half width 12.706205 * sqrt(2) / sqrt(2)
    assert mean == [2.0, 3.0] and low[0] == pytest.approx(2 - 12.706205, rel=1e-5)
    assert high[1] == pytest.approx(3 + 12.706205, rel=1e-5)
    assert stats.area_per_step([0.2, 0.4, 0.6]) == pytest.approx(0.4)


def test_regression_rule_uses_the_previous_runs_interval():
    previous = [20.0, 21.0, 22.0]  # mean 21, half width 4.3027 / sqrt(3) * 1 = 2.484: [18.52, 23.48]
    assert stats.regression([18.0, 18.5, 18.9], previous, True, 5.0)[0]  # mean 18.47 < 18.52
    assert not stats.regression([18.5, 18.6, 18.7], previous, True, 5.0)[0]  # mean 18.6: inside
    regressed, why = stats.regression([24.0, 24.0, 24.0], previous, False, 5.0)  # lower is better: above
    assert regressed and "above the previous run's 95% interval [18.52, 23.48]" in why
    # K = 1 on either side: no interval, the spec's tolerance, and the run says it cannot tell
    regressed, why = stats.regression([14.0], previous, True, 5.0)
    assert regressed and why.endswith("K = 1: cannot tell noise from a regression")
    assert not stats.regression([17.0], [21.0], True, 5.0)[0]


# ----------------------------------------------------------------------------------------------
# Reports of seeded runs (MLflow runs by hand)
# ----------------------------------------------------------------------------------------------


def _seeded_parent(uri: str, spec, values: dict[str, list[float]], scale: str = "signal",
                   first_seed: int = 0, **tags) -> str:
    """A finished parent run with, per variant, one finished child per seed holding ``spec.metric`` (0-1)
    and a short per-step ``pos_iou`` curve."""
    from mlflow.tracking import MlflowClient

    from pipelines.tracking.store import ensure_experiment, prepare_sqlite_store

    prepare_sqlite_store(uri)
    client = MlflowClient(uri)
    experiment = ensure_experiment(client, spec.experiment, uri)
    parent = client.create_run(experiment, start_time=next(_clock), tags={
        "ablation_table": spec.name, "ablation_scale": scale, "ablation_kind": "parent", "dataset": "synthetic",
        "schedule": "8 epochs", "backbone": "resnet18", **tags}).info.run_id
    for name, per_seed in values.items():
        for i, value in enumerate(per_seed):
            start = next(_clock)  # one minute after the previous run's start, 90 s long
            child = client.create_run(experiment, start_time=start, tags={
                "ablation_variant": name, "ablation_seed": str(first_seed + i), "mlflow.parentRunId": parent}).info.run_id
            client.log_metric(child, spec.metric, value, step=8)
            rise = 0.1 if name == "cross_iou_extreme" else 0.05  # the claimed variant rises faster
            for step in range(1, 5):
                client.log_metric(child, "pos_iou", 0.3 + rise * step + 0.001 * i, step=step)
            client.set_terminated(child, "FINISHED", end_time=start + 90_000)
    client.set_terminated(parent, "FINISHED")
    return parent


PREVIOUS = {"giou_rectangle": [0.200, 0.210, 0.220], "smooth_l1_rectangle": [0.150, 0.160, 0.155],
            "smooth_l1_extreme": [0.100, 0.120, 0.110], "cross_iou_extreme": [0.300, 0.315, 0.290]}


def test_planted_regression_beyond_the_noise_is_flagged_a_seed_change_is_not(tmp_path):
    from pipelines.ablations.report import build_report, render_table

    spec = load_ablation_spec("table2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _seeded_parent(uri, spec, PREVIOUS)
    current = {**PREVIOUS,
               # planted: 6 AP points worse than before, far below the previous interval [18.52, 23.48]
               "giou_rectangle": [0.140, 0.150, 0.160],
               # differs only by seed: other values from the same spread, mean 30.3 vs 30.2 before
               "cross_iou_extreme": [0.310, 0.292, 0.307]}
    latest = _seeded_parent(uri, spec, current, first_seed=3)
    report = build_report(spec, "signal", uri)
    assert report.parent_run_id == latest and report.seeds == 3
    assert [r.split(":")[0] for r in report.regressions] == ["giou_rectangle"]
    assert "below the previous run's 95% interval [18.52, 23.48] (3 seeds)" in report.regressions[0]
    rows = {r.name: r for r in report.rows}
    assert rows["cross_iou_extreme"].values == {3: pytest.approx(31.0), 4: pytest.approx(29.2),
                                                5: pytest.approx(30.7)}
    assert rows["cross_iou_extreme"].ours == pytest.approx(30.3)
    assert rows["cross_iou_extreme"].interval == pytest.approx(4.302653 * 0.9644 / math.sqrt(3), rel=1e-3)
    assert report.noise_note == ""
    # the paper's pairs (paper: giou 34.6 > cross 34.3 > sl1 rect 33.8 > sl1 extreme 31.5), paired by seed
    verdicts = {(p.better, p.worse): p.verdict for p in report.pairs}
    assert len(verdicts) == 6
    assert verdicts[("cross_iou_extreme", "smooth_l1_rectangle")] == "reproduced"  # +14.5, small spread
    assert verdicts[("giou_rectangle", "cross_iou_extreme")] == "opposite"  # -15.3 every seed
    assert verdicts[("smooth_l1_rectangle", "smooth_l1_extreme")] == "reproduced"
    # measured from these runs: cross - sl1 rect per seed 16.0, 13.2, 15.2; the first two alone give
    # t = 14.6 / (1.980 / sqrt 2) = 10.43, df 1: p = 0.0609 (unresolved), all three resolve it
    pair = next(p for p in report.pairs if (p.better, p.worse) == ("cross_iou_extreme", "smooth_l1_rectangle"))
    assert pair.resolved_from == 3 and pair.p_by_seeds[2] == pytest.approx(0.06086, rel=1e-3)
    md = report.markdown()
    assert "over 3 seeds (p = 0.003): resolved, the paper's direction: **reproduced**\n" in md
    assert "| cross-IOU, extreme points | 34.3 | 30.3 ± 2.4 |" in md
    assert "Ours (mean ± 95 % CI, K=3)" in md and "## The paper's pairs (" in md
    assert "- cross_iou_extreme: seed 3: 31.0, seed 4: 29.2, seed 5: 30.7" in md
    # cost from MLflow's times: 12 trials of 90 s, started a minute apart after the parent
    assert ("- **Cost**: 12 trials, 18.0 trial-minutes (1.5 min each), 13.5 min wall from the parent run's "
            "start to the last trial's end") in md
    # rendering: every seed's value in the JSON and on hover in the HTML; the Figure 4 claim by a number
    out = tmp_path / "out"
    rendered = render_table(spec, "signal", uri, out, latest)
    table = json.loads((out / "table2-signal" / "table.json").read_text())
    row = next(r for r in table["rows"] if r["name"] == "cross_iou_extreme")
    assert row["values"] == {"3": pytest.approx(31.0), "4": pytest.approx(29.2), "5": pytest.approx(30.7)}
    page = (out / "table2-signal" / "table.html").read_text()
    assert "title='seed 3: 31.0, seed 4: 29.2, seed 5: 30.7'" in page
    claim = rendered.curve_claim
    assert claim.variant == "cross_iou_extreme"
    # pos_iou 0.3 + 0.1 * step (+0.001 seed): area per step 0.55 + 0.001 i vs 0.425 + 0.001 i
    assert claim.areas["cross_iou_extreme"][3] == pytest.approx(0.55)
    assert all(p.verdict == "reproduced" and p.mean_diff == pytest.approx(0.125) for p in claim.pairs)
    assert table["figure4"]["smoothing_window_steps"] == stats.SMOOTH_WINDOW
    assert (out / "table2-signal" / "figure4_pos_iou.png").stat().st_size > 10_000
    # the parent's MLflow Description: the rows first (the run page folds the rest), the plots linked
    from pipelines.ablations.report import mlflow_description

    text = mlflow_description(rendered, "7", latest)
    first = text.splitlines()
    assert first[2].startswith("| Variant |") and "| cross-IOU, extreme points | 34.3 | 30.3 ± 2.4 |" in "\n".join(
        first[:8])
    assert f"[figure4_pos_iou.png](#/experiments/7/runs/{latest}/artifactPath/report/figure4_pos_iou.png)" in text
    assert len(mlflow_description(rendered, "7", latest, limit=300)) == 300


def test_a_run_with_set_overrides_says_so_and_starts_its_own_series(tmp_path):
    """``--set train.epochs=4`` is another setting: tagged on the parent by the runner, shown in the header,
    and never compared with (or flagged against) the spec's own setting."""
    from types import SimpleNamespace

    from pipelines.ablations.report import build_report
    from pipelines.ablations.runner import _start_parent_run

    spec = load_ablation_spec("table2")
    tagged = {}
    _start_parent_run(SimpleNamespace(set_tags=tagged.update), spec, "signal", SimpleNamespace(
        model=SimpleNamespace(backbone="resnet18")), spec.variants, ["train.epochs=4", "train.lr_steps=[3]"],
        tmp_path, {}, seeds=2)
    assert tagged["ablation_overrides"] == "train.epochs=4 train.lr_steps=[3]" and tagged["ablation_seeds"] == "2"
    assert json.loads((tmp_path / "ablation.json").read_text())["overrides"] == ["train.epochs=4", "train.lr_steps=[3]"]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _seeded_parent(uri, spec, PREVIOUS)
    worse = {k: [v - 0.1 for v in vs] for k, vs in PREVIOUS.items()}  # 10 AP below: a regression in one series
    _seeded_parent(uri, spec, worse, ablation_overrides=tagged["ablation_overrides"])
    report = build_report(spec, "signal", uri, with_curves=False)
    assert report.previous_run_id is None and report.regressions == []
    assert "- **Overrides**: `train.epochs=4 train.lr_steps=[3]` (--set, over the scale's settings above)" in (
        report.markdown())


def test_an_interrupted_table_ends_killed_a_failed_one_failed():
    """A SIGTERM that lands while Ray starts (Ray's handler: ``sys.exit(SIGTERM)``) is a kill like Ctrl-C."""
    import signal

    from pipelines.ablations.runner import interrupted_status

    assert interrupted_status(KeyboardInterrupt()) == "KILLED"
    assert interrupted_status(SystemExit(signal.SIGTERM)) == "KILLED"
    assert interrupted_status(SystemExit(1)) == "FAILED" and interrupted_status(RuntimeError("x")) == "FAILED"


def test_runs_compare_groups_seeded_children_by_variant(tmp_path, capsys):
    from pipelines.cli import main

    spec = load_ablation_spec("table2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parent = _seeded_parent(uri, spec, PREVIOUS)
    assert main(["runs", "compare", parent, "--tracking-uri", uri, "--sort"]) == 0
    out = capsys.readouterr().out
    assert "12 runs grouped by variant" in out
    lines = [line for line in out.splitlines() if line.split() and line.split()[0] in PREVIOUS]
    assert [line.split()[0] for line in lines] == ["cross_iou_extreme", "giou_rectangle", "smooth_l1_rectangle",
                                                   "smooth_l1_extreme"]  # best mean first
    # giou: 0.20, 0.21, 0.22 -> mean 0.2100 ± 4.302653 * 0.01 / sqrt(3) = 0.0248
    giou = next(line for line in lines if line.startswith("giou_rectangle"))
    assert "0.2100 ± 0.0248" in giou and "s0:0.2000 s1:0.2100 s2:0.2200" in giou and " 3 " in giou
    assert main(["runs", "compare", parent, "--tracking-uri", uri, "--per-run"]) == 0
    assert "grouped" not in capsys.readouterr().out


def test_one_seed_says_it_cannot_tell_noise_from_regression(tmp_path):
    from pipelines.ablations.report import build_report

    spec = load_ablation_spec("table2")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _seeded_parent(uri, spec, {k: v[:1] for k, v in PREVIOUS.items()})
    _seeded_parent(uri, spec, {k: v[:1] for k, v in PREVIOUS.items()})
    report = build_report(spec, "signal", uri)
    assert report.seeds == 1 and report.regressions == []
    assert "cannot tell noise from a regression" in report.noise_note
    assert "cannot tell noise from a regression" in report.markdown()
    assert all(p.verdict == "unresolved" for p in report.pairs)


# ----------------------------------------------------------------------------------------------
# End to end: seeds as trials, and the committed tables untouched (issue 23 item 4)
# ----------------------------------------------------------------------------------------------


def _git_status(root) -> str:
    return subprocess.run(["git", "status", "--porcelain", "--", "results", ".gitignore"], cwd=root,
                          capture_output=True, text=True, check=True).stdout


@pytest.mark.slow
@pytest.mark.long
def test_tiny_run_with_seeds_leaves_the_committed_tables_alone(ray_session, tmp_path, monkeypatch, capsys):
    import shutil

    from mlflow.tracking import MlflowClient

    from pipelines.cli import main
    from pipelines.cli.ablation import DEFAULT_OUT
    from pipelines.paths import REPO_ROOT

    default_out = REPO_ROOT / DEFAULT_OUT
    existed = default_out.exists()
    before = _git_status(REPO_ROOT)
    committed = (REPO_ROOT / "results" / "ablations" / "table2-tiny" / "table.md").read_bytes()
    monkeypatch.chdir(REPO_ROOT)  # as a user runs it: from the checkout, with the default --out
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    try:
        code = main(["ablation", "run", "table2", "--scale", "tiny", "--tracking-uri", uri, "--seeds", "2",
                     "--variants", "smooth_l1_extreme,cross_iou_extreme", "--set", "train.epochs=1",
                     "--set", "train.eval_every=1"])
        assert code == 0, capsys.readouterr()
        assert _git_status(REPO_ROOT) == before  # nothing committed (or ignorable) changed
        assert (REPO_ROOT / "results" / "ablations" / "table2-tiny" / "table.md").read_bytes() == committed
        table = json.loads((default_out / "table2-tiny" / "table.json").read_text())
    finally:
        if not existed:
            shutil.rmtree(default_out, ignore_errors=True)
        else:
            shutil.rmtree(default_out / "table2-tiny", ignore_errors=True)
    assert table["seeds"] == 2
    for row in table["rows"]:
        assert sorted(row["values"]) == ["0", "1"] and len(set(row["run_ids"].values())) == 2
        assert row["interval"] is not None and row["ours"] == pytest.approx(sum(row["values"].values()) / 2)
    client = MlflowClient(uri)
    children = client.search_runs([client.get_experiment_by_name("lsnet-ablations").experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{table['parent_run_id']}'")
    seeds = sorted((r.data.tags["ablation_variant"], r.data.tags["ablation_seed"], r.data.params["train.seed"])
                   for r in children)
    assert seeds == [("cross_iou_extreme", "0", "0"), ("cross_iou_extreme", "1", "1"),
                     ("smooth_l1_extreme", "0", "0"), ("smooth_l1_extreme", "1", "1")]
    assert len(table["pairs"]) == 1 and table["pairs"][0]["better"] == "cross_iou_extreme"


def test_ablation_run_writes_to_an_ignored_folder_and_publishes_only_on_purpose(monkeypatch):
    """Issue 23 item 4 without training (the end-to-end run is the `long` test above): a user's
    `lsnet ablation run` goes to results/ablation_runs (ignored by git), the committed tables under
    results/ablations are replaced only with --publish."""
    import subprocess

    from pipelines.ablations import runner
    from pipelines.cli import main
    from pipelines.cli.ablation import PUBLISHED_DIR
    from pipelines.paths import REPO_ROOT

    calls = []
    monkeypatch.setattr(runner, "run_tables", lambda specs, scale, out, uri, *a, **kw: calls.append((out, kw)) or [])
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////tmp/lsnet-item4-never-opened.db")
    main(["ablation", "run", "table2", "--scale", "tiny"])
    main(["ablation", "run", "table2", "--scale", "tiny", "--publish"])
    (out, plain), (_, published) = calls
    assert out == Path("results/ablation_runs") and plain["publish"] is None
    assert published["publish"] == PUBLISHED_DIR and Path(PUBLISHED_DIR).parts[-2:] == ("results", "ablations")
    ignored = subprocess.run(["git", "check-ignore", "-q", "results/ablation_runs/table2-tiny/table.md"],
                             cwd=REPO_ROOT, check=False)
    tracked = subprocess.run(["git", "check-ignore", "-q", "results/ablations/table2-tiny/table.md"], cwd=REPO_ROOT, check=False)
    assert ignored.returncode == 0 and tracked.returncode == 1
