"""The project's statistics, defined once: standard errors, 95% t intervals, the paired t-test and Holm.

plot.py's comparison table, experiment.py's final_info.json and every bench/ study call these, so a number
in notes.txt and the same number in a study's summary.md come from one formula. numpy and scipy only (plot.py
must stay free of torch); scipy is imported inside the functions that need it, because experiment.py imports
this module and must not pay scipy's import time at start-up.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional, Sequence

import numpy as np

LEVEL = 0.95  # every interval in the project is a 95% interval


class Difference(NamedTuple):
    """a - b with its 95% interval; p is the paired t-test's (None where there is none)."""
    mean: float
    low: Optional[float]
    high: Optional[float]
    p: Optional[float]
    n: int


def stderr(values):
    """std(ddof=1)/sqrt(n) along the first axis (n = len(values)); None for n < 2, where a spread cannot be
    estimated (never a misleading 0). A list of numbers gives a float, a stack of curves an array."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    spread = values.std(axis=0, ddof=1) / math.sqrt(len(values))
    return float(spread) if spread.ndim == 0 else spread


def mean_and_stderr(values) -> tuple[float, Optional[float]]:
    """Mean and standard error of the mean; the error None when n < 2 (no honest estimate)."""
    return float(np.asarray(values, dtype=np.float64).mean()), stderr(values)


def t_quantile(df: float) -> float:
    """The two-sided 95% quantile of Student's t with df degrees of freedom."""
    from scipy import stats
    return float(stats.t.ppf(0.5 + LEVEL / 2, df))


def mean_interval(values) -> Optional[tuple[float, float]]:
    """95% t interval of the mean of values; None for n < 2."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return None
    half = t_quantile(len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values))
    return float(values.mean() - half), float(values.mean() + half)


def trend(values, last: int = 100) -> dict:
    """The least-squares slope of the last `last` values against their index (an episode each), per 100
    episodes, with its 95% t interval (None under 3 values): a learning curve is flat where the interval
    holds 0."""
    from scipy import stats
    values = np.asarray(values, dtype=float)[-last:]
    if len(values) < 3:
        return {"per_100_episodes": None, "ci95": None}
    fit = stats.linregress(np.arange(len(values)), values)
    half = t_quantile(len(values) - 2) * fit.stderr
    return {"per_100_episodes": float(100 * fit.slope),
            "ci95": [float(100 * (fit.slope - half)), float(100 * (fit.slope + half))]}


def paired_difference(a, b) -> Difference:
    """a - b paired element by element (the same seed in both): mean, 95% t interval and paired t-test p.

    Pairing removes the noise two runs of one seed share (initialisation, data order). With n < 2 there is
    no interval and no p. p is None where the test is undefined (every difference equal, e.g. all 0)."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
    d = a - b
    n = len(d)
    if n < 2:
        return Difference(float(d.mean()) if n else math.nan, None, None, None, n)
    from scipy import stats
    half = t_quantile(n - 1) * d.std(ddof=1) / math.sqrt(n)
    with np.errstate(all="ignore"):
        p = float(stats.ttest_rel(a, b).pvalue)
    return Difference(float(d.mean()), float(d.mean() - half), float(d.mean() + half),
                      None if math.isnan(p) else p, n)


def welch_difference(a, b) -> Difference:
    """a - b of two unpaired samples (each n >= 2): difference of means with Welch's 95% t interval, no p."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    diff = float(a.mean() - b.mean())
    var_a, var_b = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    se = math.sqrt(var_a + var_b)
    if se > 0:  # Welch-Satterthwaite degrees of freedom
        df = (var_a + var_b) ** 2 / (var_a ** 2 / (len(a) - 1) + var_b ** 2 / (len(b) - 1))
        half = t_quantile(df) * se
    else:
        half = 0.0
    return Difference(diff, diff - half, diff + half, None, min(len(a), len(b)))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm-Bonferroni step-down adjusted p-values, in the order given (scipy.stats has BH/BY only, no Holm).

    The k-th smallest p (k from 0) is multiplied by m - k, capped at 1, and never below an earlier one's.
    """
    m = len(p_values)
    adjusted, running = [0.0] * m, 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p_values[i])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted
