"""The statistics of an ablation table run with K seeds per variant (issue 22 §1): pure functions on
numbers, no MLflow.

- **Interval** of a variant: the 95 % Student-t interval of the mean over its seeds,
  ``mean ± t(0.975, K-1) · s / √K`` (``s`` the sample standard deviation). K = 1 has none.
- **Pairs** the paper ranks: a *paired* t-test across seeds (two-sided, level 0.05). Seed ``i`` of every
  variant starts from the same initial weights where the models share them and sees the images in the
  same order (``train.seed``), so the seed-to-seed noise the two variants share cancels in the
  per-seed differences; two intervals that merely overlap can still be a resolved pair. A pair is
  *resolved* when the test rejects "no difference", in the direction of the mean difference;
  the paper's ranking is *reproduced* only where it is resolved the same way.
- **Regression** of a variant against the previous run of the same table: its mean falls below the
  lower end of the previous run's 95 % interval (above the upper end for a lower-is-better metric).
  With K = 1 on either side there is no interval: the run cannot tell noise from a regression and says
  so; :func:`regression` then falls back to the spec's fixed tolerance, labelled as such.
- **Curves** (Figure 4): each seed's per-step series smoothed by a trailing moving average of
  :data:`SMOOTH_WINDOW` steps, then the mean over seeds with its 95 % t band per step; the number read
  from a curve is its area under the curve per step (the mean of the raw series over all steps: how
  high the curve is on average, i.e. how early it rises), one value per seed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

#: two-sided level of the intervals and tests
LEVEL = 0.95
#: the trailing moving-average window (training steps) of the Figure 4 curves
SMOOTH_WINDOW = 25


def t_quantile(df: int, level: float = LEVEL) -> float:
    """The two-sided Student-t critical value ``t((1 + level) / 2, df)``."""
    from scipy.stats import t

    return float(t.ppf((1 + level) / 2, df))


@dataclass(frozen=True)
class Interval:
    mean: float
    half_width: float | None  # None: fewer than two values
    n: int

    @property
    def low(self) -> float | None:
        return None if self.half_width is None else self.mean - self.half_width

    @property
    def high(self) -> float | None:
        return None if self.half_width is None else self.mean + self.half_width


def t_interval(values: list[float], level: float = LEVEL) -> Interval | None:
    """Mean and the half width of its ``level`` Student-t interval; None for no values."""
    n = len(values)
    if n == 0:
        return None
    mean = sum(values) / n
    if n < 2:
        return Interval(mean, None, n)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return Interval(mean, t_quantile(n - 1, level) * sd / math.sqrt(n), n)


@dataclass(frozen=True)
class PairTest:
    """``a`` vs ``b`` over the seeds both have: mean of ``a - b``, the paired t statistic, its p value."""

    mean_diff: float
    n: int
    t: float | None
    p: float | None  # None: fewer than two paired seeds

    def resolved(self, level: float = LEVEL) -> bool:
        return self.p is not None and self.p < 1 - level


def paired_test(a: dict[int, float], b: dict[int, float]) -> PairTest | None:
    """Two-sided paired t-test of ``a - b`` over the seeds in both (``{seed: value}``); None if none shared.

    Identical differences (zero spread, bit-reproducible runs) are resolved when not zero (p = 0)."""
    from scipy.stats import t as student

    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    n = len(diffs)
    mean = sum(diffs) / n
    if n < 2:
        return PairTest(mean, n, None, None)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    if sd == 0:
        return PairTest(mean, n, math.inf if mean else 0.0, 0.0 if mean else 1.0)
    stat = mean / (sd / math.sqrt(n))
    return PairTest(mean, n, stat, float(2 * student.sf(abs(stat), n - 1)))


def seeds_to_resolve(a: dict[int, float], b: dict[int, float], most: int = 50) -> int | None:
    """A projection, not a measurement: the fewest seeds K at which the paired test would resolve ``a``
    vs ``b`` if more seeds kept the observed mean difference and spread (``t(K-1)·s/√K < |mean|``);
    None when the pair has fewer than two shared seeds, no difference, or needs more than ``most``."""
    seeds = sorted(set(a) & set(b))
    if len(seeds) < 2:
        return None
    diffs = [a[s] - b[s] for s in seeds]
    mean = sum(diffs) / len(diffs)
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1))
    if mean == 0:
        return None
    for k in range(2, most + 1):
        if t_quantile(k - 1) * sd / math.sqrt(k) < abs(mean):
            return k
    return None


def resolved_from(a: dict[int, float], b: dict[int, float]) -> tuple[int | None, dict[int, float]]:
    """A measurement, not a projection: the paired test on the first ``k`` shared seeds (ascending seed
    number) for every ``k`` from 2 to all of them -> ``(k_min, {k: p})``, where ``k_min`` is the fewest
    first seeds from which the pair stays resolved, in the direction it has over all seeds, through every
    larger ``k`` (None: not resolved over all seeds). It answers "would a cheaper run (fewer seeds) have
    said the same?" from the runs made, so a table's cheapest resolving seed count is read, not guessed."""
    seeds = sorted(set(a) & set(b))
    by_k: dict[int, PairTest] = {}
    for k in range(2, len(seeds) + 1):
        first = seeds[:k]
        by_k[k] = paired_test({s: a[s] for s in first}, {s: b[s] for s in first})
    p_by_k = {k: test.p for k, test in by_k.items() if test.p is not None}
    if not by_k or not by_k[len(seeds)].resolved():
        return None, p_by_k
    direction = by_k[len(seeds)].mean_diff > 0
    k_min = len(seeds)
    for k in range(len(seeds), 1, -1):
        if not (by_k[k].resolved() and (by_k[k].mean_diff > 0) == direction):
            break
        k_min = k
    return k_min, p_by_k


def pair_verdict(test: PairTest | None, paper_first_better: bool, higher_is_better: bool) -> str:
    """``reproduced`` / ``opposite`` (resolved, the other way) / ``unresolved`` for a pair the paper ranks
    (``paper_first_better``: the paper puts the pair's first variant above the second)."""
    if test is None or not test.resolved():
        return "unresolved"
    first_better = (test.mean_diff > 0) == higher_is_better
    return "reproduced" if first_better == paper_first_better else "opposite"


def regression(current: list[float], previous: list[float], higher_is_better: bool,
               tolerance: float) -> tuple[bool, str]:
    """``(regressed, why)`` of a variant's seeds against the previous run's (see the module docstring)."""
    now, before = t_interval(current), t_interval(previous)
    if now is None or before is None:
        return False, ""
    if now.n >= 2 and before.half_width is not None:
        bound = before.low if higher_is_better else before.high
        worse = now.mean < bound if higher_is_better else now.mean > bound
        side = "below" if higher_is_better else "above"
        return worse, (f"mean {now.mean:.2f} over {now.n} seeds {side} the previous run's {LEVEL:.0%} interval "
                       f"[{before.low:.2f}, {before.high:.2f}] ({before.n} seeds)")
    drop = (before.mean - now.mean) if higher_is_better else (now.mean - before.mean)
    return drop > tolerance, (f"{now.mean:.2f} vs {before.mean:.2f} in the previous run (worse by {drop:.2f} > "
                              f"tolerance {tolerance:.2f}); K = 1: cannot tell noise from a regression")


def smooth(values: list[float], window: int = SMOOTH_WINDOW) -> list[float]:
    """Trailing moving average: point ``i`` is the mean of points ``max(0, i-window+1) .. i``."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def mean_band(series: list[list[float]], level: float = LEVEL) -> tuple[list[float], list[float], list[float]]:
    """Per position over the seeds' series (cut to the shortest): ``(mean, low, high)`` of the t interval
    (low = high = mean with one series)."""
    length = min(len(s) for s in series)
    mean, low, high = [], [], []
    for i in range(length):
        iv = t_interval([s[i] for s in series], level)
        mean.append(iv.mean)
        low.append(iv.mean if iv.half_width is None else iv.low)
        high.append(iv.mean if iv.half_width is None else iv.high)
    return mean, low, high


def area_per_step(values: list[float]) -> float:
    """Area under a per-step curve divided by its number of steps (the mean value over training)."""
    return sum(values) / len(values) if values else float("nan")
