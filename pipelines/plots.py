"""PNG line plots shared by training runs (curves logged at the end of a run), searches
(metric vs epoch of every trial) and ``lsnet runs plot``. Matplotlib with the Agg backend (no display)."""
from __future__ import annotations

import json
from pathlib import Path

Series = list[tuple[float, float]]


def plot_series(series: dict[str, Series], path: str | Path, *, xlabel: str, ylabel: str,
                title: str | None = None, dashed: set[str] | frozenset[str] = frozenset()) -> Path:
    """One line per entry of ``series`` (label -> [(x, y), ...]); labels in ``dashed`` drawn dashed
    (e.g. early-stopped trials). Empty series are skipped; the file is written even if all are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8), dpi=100)
    drawn = 0
    for label, points in series.items():
        if not points:
            continue
        xs, ys = zip(*sorted(points))
        ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3,
                linestyle="--" if label in dashed else "-", label=label)
        drawn += 1
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def epoch_log(path: str | Path) -> list[dict]:
    """``epochs.jsonl`` of a run directory, one record per epoch (an epoch repeated by a resumed
    attempt keeps its last record), in epoch order."""
    by_epoch: dict[int, dict] = {}
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            by_epoch[int(record["epoch"])] = record
    return [by_epoch[e] for e in sorted(by_epoch)]


def run_curve_plots(run_dir: str | Path, primary_metric: str, loss_keys: tuple[str, ...]) -> list[Path]:
    """``curves/loss.png`` (each loss term per epoch) and ``curves/<primary_metric>.png`` (per evaluated
    epoch) of a finished run, from its ``epochs.jsonl``."""
    run_dir = Path(run_dir)
    records = epoch_log(run_dir / "epochs.jsonl")
    out = run_dir / "curves"
    losses = {key: [(r["epoch"], r[key]) for r in records if key in r] for key in loss_keys}
    paths = [plot_series(losses, out / "loss.png", xlabel="epoch", ylabel="loss (epoch mean)",
                         title=run_dir.name)]
    ap = [(r["epoch"], r[primary_metric]) for r in records if primary_metric in r]
    if ap:
        paths.append(plot_series({primary_metric: ap}, out / f"{primary_metric}.png", xlabel="epoch",
                                 ylabel=primary_metric, title=run_dir.name))
    return paths
