"""Statistics for direction and early-detection reports.

Libraries where one does the job: scikit-learn for AUROC / ROC, grouped folds and the logistic
probe; scipy for Spearman, the Wilson interval and percentiles. By hand only what no library
does: Cohen's d with a pooled SD, the bootstrap over whole groups and the layer-selection
protocol. Everything random takes a ``seed``.

Groups: a question with all its paraphrases and samples is one group. Every fold, split and
bootstrap here keeps a group whole, so that no figure is computed on a question whose twin
was used to fit or select. ``groups=None`` makes each row its own group.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
from scipy import stats as scipy_stats
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV
from sklearn.metrics import roc_auc_score
from sklearn.metrics import roc_curve as sklearn_roc_curve
from sklearn.model_selection import StratifiedGroupKFold
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from core.errors import InputError

__all__ = [
    "wilson_interval",
    "auroc",
    "roc_curve",
    "spearman",
    "cohens_d",
    "percentile_in",
    "bootstrap_counts",
    "bootstrap_ci",
    "auroc_ci",
    "grouped_folds",
    "grouped_split",
    "fit_probe",
    "choose_layer_and_report",
]


class StatsError(InputError):
    """Data a statistic cannot be computed on (too few rows, one class only, NaN, mismatched lengths)."""


# --------------------------------------------------------------------------- input checks


def _check_level(level: float) -> float:
    if not (0.0 < float(level) < 1.0):
        raise StatsError(f"level must be in (0, 1), got {level!r}")
    return float(level)


def _as_1d_float(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise StatsError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _as_binary_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """Boolean or 0/1 labels -> bool array; anything else is a ValueError."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise StatsError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise StatsError(f"{name} must be boolean or 0/1, got dtype {arr.dtype}")
    if arr.dtype.kind == "f" and np.isnan(arr).any():
        raise StatsError(f"{name} contain NaN (first at index {int(np.flatnonzero(np.isnan(arr))[0])})")
    bad = np.flatnonzero((arr != 0) & (arr != 1))
    if bad.size:
        raise StatsError(f"{name} must be boolean or 0/1; found value {arr[bad[0]].item()!r} at index {int(bad[0])}")
    return arr == 1


def _scores_and_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _as_1d_float(scores, "scores")
    y = _as_binary_labels(labels)
    if s.shape[0] != y.shape[0]:
        raise StatsError(f"length mismatch: scores has {s.shape[0]} entries, labels has {y.shape[0]}")
    if np.isnan(s).any():
        raise StatsError(f"scores contain NaN (first at index {int(np.flatnonzero(np.isnan(s))[0])})")
    n_pos = int(y.sum())
    if n_pos in (0, y.size):
        which = "positive" if n_pos == 0 else "negative"
        raise StatsError(
            f"only one class present in labels (no {which} examples; {n_pos} positive, "
            f"{y.size - n_pos} negative): AUROC is undefined"
        )
    return s, y


def _groups_or_rows(groups: Any, n: int) -> np.ndarray:
    """Group ids as dense integers 0..G-1; ``None`` -> each row its own group."""
    if groups is None:
        return np.arange(n)
    g = np.asarray(groups)
    if g.ndim != 1 or g.shape[0] != n:
        raise StatsError(f"length mismatch: groups has shape {g.shape}, expected {n} entries")
    return np.unique(g, return_inverse=True)[1].ravel()


# --------------------------------------------------------------------------- point statistics


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k / n (scipy); ``(nan, nan)`` when n == 0."""
    if isinstance(k, bool) or isinstance(n, bool) or int(k) != k or int(n) != n:
        raise StatsError(f"k and n must be integers, got k={k!r}, n={n!r}")
    k, n, level = int(k), int(n), _check_level(level)
    if n < 0:
        raise StatsError(f"n must be >= 0, got n={n}")
    if not 0 <= k <= n:
        raise StatsError(f"k must satisfy 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    ci = scipy_stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return (float(ci.low), float(ci.high))


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve (scikit-learn); labels boolean or 0/1, True / 1 = positive (misaligned)."""
    s, y = _scores_and_labels(scores, labels)
    return float(roc_auc_score(y, s))


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(fpr, tpr, thresholds)`` (scikit-learn), one point per distinct score, starting at (0, 0) / +inf."""
    s, y = _scores_and_labels(scores, labels)
    fpr, tpr, thresholds = sklearn_roc_curve(y, s, drop_intermediate=False)
    return fpr, tpr, thresholds


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation (scipy); NaN when either input is constant or shorter than 2."""
    a, b = _as_1d_float(x, "x"), _as_1d_float(y, "y")
    if a.shape[0] != b.shape[0]:
        raise StatsError(f"length mismatch: x has {a.shape[0]} entries, y has {b.shape[0]}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise StatsError("x or y contains NaN")
    if a.size < 2 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return math.nan
    return float(scipy_stats.spearmanr(a, b).statistic)


def cohens_d(a: Any, b: Any) -> float:
    """Cohen's d = (mean(b) - mean(a)) / pooled SD (ddof=1 in each group): positive when b is larger.

    Pass the aligned set as ``a`` and the misaligned set as ``b``. NaN when the pooled SD is 0."""
    x, w = _as_1d_float(a, "a"), _as_1d_float(b, "b")
    if x.size < 2 or w.size < 2:
        raise StatsError(f"cohens_d needs at least 2 values in each group, got len(a)={x.size}, len(b)={w.size}")
    if np.isnan(x).any() or np.isnan(w).any():
        raise StatsError("a or b contains NaN")
    pooled_var = ((x.size - 1) * x.var(ddof=1) + (w.size - 1) * w.var(ddof=1)) / (x.size + w.size - 2)
    if pooled_var <= 0.0:
        return math.nan
    return float((w.mean() - x.mean()) / math.sqrt(pooled_var))


def percentile_in(value: float, null: Any) -> float:
    """Percentile (0-100) of ``value`` within a null sample, ties counted half (scipy)."""
    return float(scipy_stats.percentileofscore(_as_1d_float(null, "null"), value, kind="mean"))


# --------------------------------------------------------------------------- bootstrap over whole groups


def bootstrap_counts(n_rows: int, n_boot: int, seed: int = 0, groups: Any = None, stratify: Any = None) -> np.ndarray:
    """``[n_boot, n_rows]`` multiplicities of each row in each resample of whole groups.

    Groups are drawn with replacement within strata, a group's stratum being the set of
    ``stratify`` values among its rows (e.g. all-aligned, all-misaligned, mixed), so every
    resample keeps the number of groups of each kind and both classes stay present.
    """
    if int(n_boot) < 1:
        raise StatsError(f"n_boot must be >= 1, got {n_boot}")
    if n_rows < 1:
        raise StatsError("bootstrap got empty arrays")
    group_of = _groups_or_rows(groups, n_rows)
    n_groups = int(group_of.max()) + 1
    if stratify is None:
        stratum_of_group = np.zeros(n_groups, dtype=np.int64)
    else:
        strat = np.asarray(stratify)
        if strat.ndim != 1 or strat.shape[0] != n_rows:
            raise StatsError(f"length mismatch: stratify has shape {strat.shape}, arrays have {n_rows} rows")
        kinds = [tuple(np.unique(strat[group_of == g]).tolist()) for g in range(n_groups)]
        index = {kind: i for i, kind in enumerate(sorted(set(kinds)))}
        stratum_of_group = np.array([index[kind] for kind in kinds])
    rng = np.random.default_rng(seed)
    group_counts = np.zeros((int(n_boot), n_groups), dtype=np.int64)
    rows = np.arange(int(n_boot))[:, None]
    for stratum in np.unique(stratum_of_group):
        members = np.flatnonzero(stratum_of_group == stratum)
        drawn = members[rng.integers(0, members.size, size=(int(n_boot), members.size))]
        np.add.at(group_counts, (rows, drawn), 1)
    return group_counts[:, group_of]


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: Any,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    stratify: Any = None,
    groups: Any = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval for ``statistic(*arrays)``, resampling whole groups.

    The same resampled rows are applied to every array. Resamples where the statistic raises
    ``ValueError`` or returns NaN are skipped; more than half skipped is a ``ValueError``.
    """
    if not arrays:
        raise StatsError("bootstrap_ci needs at least one array")
    level = _check_level(level)
    arrs = [np.asarray(a) for a in arrays]
    for i, a in enumerate(arrs):
        if a.ndim == 0:
            raise StatsError(f"array {i} is a scalar; bootstrap needs arrays with rows")
        if a.shape[0] != arrs[0].shape[0]:
            raise StatsError(f"length mismatch: array 0 has {arrs[0].shape[0]} rows, array {i} has {a.shape[0]}")
    n = arrs[0].shape[0]
    counts = bootstrap_counts(n, n_boot, seed, groups, stratify)
    values = np.empty(counts.shape[0])
    for b, multiplicity in enumerate(counts):
        rows = np.repeat(np.arange(n), multiplicity)
        try:
            values[b] = float(statistic(*(a[rows] for a in arrs)))
        except ValueError:
            values[b] = math.nan
    return _percentile_interval(values, level)


def _percentile_interval(values: np.ndarray, level: float) -> tuple[float, float]:
    ok = values[~np.isnan(values)]
    if (values.size - ok.size) * 2 > values.size:
        raise StatsError(
            f"bootstrap: statistic failed (ValueError or NaN) on {values.size - ok.size} of "
            f"{values.size} resamples (more than half); pass stratify= to keep every class"
        )
    alpha = (1.0 - level) / 2.0
    lo, hi = np.quantile(ok, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


def auroc_ci(
    scores: Any, labels: Any, groups: Any = None, n_boot: int = 2000, level: float = 0.95, seed: int = 0
) -> tuple[float, float]:
    """Percentile bootstrap interval of the AUROC, resampling whole groups.

    A resample is a vector of row multiplicities, and its AUROC is the weighted Mann-Whitney
    statistic (what ``roc_auc_score(..., sample_weight=multiplicities)`` computes), evaluated
    for all resamples at once: thousands of resamples cost milliseconds. Resamples without
    both classes are skipped.
    """
    s, y = _scores_and_labels(scores, labels)
    level = _check_level(level)
    # Not stratified by class: holding the number of all-misaligned groups fixed undercovers when
    # labels cluster within questions (about 90% for a nominal 95% with 40 groups, simulated).
    counts = bootstrap_counts(s.size, n_boot, seed, groups).astype(np.float64)
    pos, neg = s[y], s[~y]
    kernel = (pos[:, None] > neg[None, :]) + 0.5 * (pos[:, None] == neg[None, :])
    w_pos, w_neg = counts[:, y], counts[:, ~y]
    denominator = w_pos.sum(1) * w_neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = ((w_pos @ kernel) * w_neg).sum(1) / denominator
    values[denominator == 0] = math.nan
    return _percentile_interval(values, level)


# --------------------------------------------------------------------------- grouped folds, splits, probe


def grouped_folds(labels: Any, groups: Any = None, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold id (0..folds-1) per row from scikit-learn's seeded ``StratifiedGroupKFold``: groups stay whole."""
    y = np.asarray(labels)
    if y.ndim != 1:
        raise StatsError(f"labels must be 1-D, got shape {y.shape}")
    group_of = _groups_or_rows(groups, y.size)
    n_groups = int(group_of.max()) + 1 if y.size else 0
    if int(folds) < 2:
        raise StatsError(f"folds must be >= 2, got {folds}")
    if n_groups < int(folds):
        raise StatsError(f"only {n_groups} group(s), fewer than folds={folds}: add questions or lower folds")
    splitter = StratifiedGroupKFold(n_splits=int(folds), shuffle=True, random_state=seed)
    fold_of = np.empty(y.size, dtype=np.int64)
    with warnings.catch_warnings():  # "least populated class has fewer members than n_splits": still valid
        warnings.simplefilter("ignore", UserWarning)
        for f, (_, test) in enumerate(splitter.split(np.zeros((y.size, 1)), y, group_of)):
            fold_of[test] = f
    return fold_of


def grouped_split(
    labels: Any, groups: Any = None, heldout_fraction: float = 0.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """``(select_idx, report_idx)``: whole groups, stratified by label, seeded.

    The report share is rounded to 1/k (or 1 - 1/k above one half) so that the split is one
    fold of :func:`grouped_folds`. Both halves must hold both classes.
    """
    y = _as_binary_labels(labels)
    if not (0.0 < float(heldout_fraction) < 1.0):
        raise StatsError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")
    k = max(2, round(1.0 / min(heldout_fraction, 1.0 - heldout_fraction)))
    one_fold = grouped_folds(y, groups, k, seed) == 0
    in_report = one_fold if heldout_fraction <= 0.5 else ~one_fold
    for name, part in (("selection", ~in_report), ("report", in_report)):
        if y[part].all() or not y[part].any():
            raise StatsError(
                f"the {name} half has only {'misaligned' if y[part].any() else 'aligned'} prompts: "
                "need at least 2 groups of each class to split into selection and report halves"
            )
    return np.flatnonzero(~in_report), np.flatnonzero(in_report)


def fit_probe(X: Any, y: Any, groups: Any = None, folds: int = 5, seed: int = 0) -> Pipeline:
    """Standardised L2 logistic regression, its strength chosen by grouped cross-validation.

    Returns the fitted scikit-learn pipeline (``predict_proba``). With fewer than two groups of
    a class the strength cannot be cross-validated and C = 1 is used.
    """
    Xa = np.asarray(X, dtype=np.float64)
    Xa = Xa[:, None] if Xa.ndim == 1 else Xa
    yb = _as_binary_labels(y, "y")
    if Xa.ndim != 2 or Xa.shape[0] != yb.shape[0]:
        raise StatsError(f"length mismatch: X has shape {Xa.shape}, y has {yb.shape[0]} entries")
    if np.isnan(Xa).any():
        raise StatsError("X contains NaN")
    if yb.all() or not yb.any():
        raise StatsError("only one class present in y: cannot fit a probe")
    group_of = _groups_or_rows(groups, yb.size)
    per_class = min(np.unique(group_of[yb]).size, np.unique(group_of[~yb]).size)
    k = min(int(folds), per_class)
    if k >= 2:
        splits = [
            (np.flatnonzero(f != i), np.flatnonzero(f == i))
            for f in [grouped_folds(yb, group_of, k, seed)]
            for i in range(k)
        ]
        model = LogisticRegressionCV(
            Cs=10, cv=splits, scoring="neg_log_loss", l1_ratios=(0.0,), use_legacy_attributes=False, max_iter=2000
        )
    else:
        model = LogisticRegression(C=1.0, max_iter=2000)
    return make_pipeline(StandardScaler(), model).fit(Xa, yb)


# --------------------------------------------------------------------------- layer-selection protocol


def choose_layer_and_report(
    scores_by_layer: Any,
    labels: Any,
    select_idx: Any,
    report_idx: Any,
    groups: Any = None,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> dict:
    """Pick the layer with the highest AUROC on the selection rows; report its AUROC on the report rows.

    The report figure comes with a bootstrap interval over whole groups, so it is inflated
    neither by the choice among layers nor by twins of a question across the halves (the
    caller's split must keep groups whole: :func:`grouped_split`). Ties go to the first layer.
    """
    S = np.asarray(scores_by_layer, dtype=np.float64)
    if S.ndim != 2 or S.shape[0] == 0:
        raise StatsError(f"scores_by_layer must be 2-D [n_layers, n] with a layer, got shape {S.shape}")
    y = _as_binary_labels(labels)
    if S.shape[1] != y.shape[0]:
        raise StatsError(
            f"length mismatch: scores_by_layer has {S.shape[1]} prompts per layer, labels has {y.shape[0]}"
        )
    nan_rows = np.flatnonzero(np.isnan(S).any(axis=1))
    if nan_rows.size:
        raise StatsError(f"scores contain NaN at layer {int(nan_rows[0])}")
    select, report = np.asarray(select_idx, dtype=np.int64), np.asarray(report_idx, dtype=np.int64)
    group_of = _groups_or_rows(groups, y.size)
    if np.intersect1d(group_of[select], group_of[report]).size:
        raise StatsError("a group has rows in both the selection and the report set")
    selection = [auroc(S[layer, select], y[select]) for layer in range(S.shape[0])]
    best = int(np.argmax(selection))
    report_scores, report_labels = S[best, report], y[report]
    return {
        "layer": best,
        "selection_auroc": float(selection[best]),
        "report_auroc": auroc(report_scores, report_labels),
        "report_ci": list(auroc_ci(report_scores, report_labels, group_of[report], n_boot, level, seed)),
        "n_select": int(select.size),
        "n_report": int(report.size),
        "selection_aurocs": [float(a) for a in selection],
    }
