"""Statistics for evaluation and early-detection reports.

Plain functions on numpy arrays; no scipy / sklearn. Everything random takes a ``seed``
and draws from ``np.random.default_rng(seed)``, so results are reproducible.

Public API
----------
- :func:`wilson_interval`         binomial proportion CI (Wilson score)
- :func:`rankdata`                average ranks (ties share the mean rank)
- :func:`auroc`                   Mann-Whitney AUROC, ties count 1/2
- :func:`roc_curve`               (fpr, tpr, thresholds); trapezoid area == auroc
- :func:`spearman`                Spearman rank correlation (Pearson on average ranks)
- :func:`cohens_d`                (mean(b) - mean(a)) / pooled SD
- :func:`bootstrap_ci`            percentile bootstrap, optional stratification
- :func:`stratified_folds`        seeded stratified fold assignment
- :func:`fit_logistic`            L2 logistic regression (torch LBFGS, float64)
- :func:`logistic_probe_cv`       out-of-fold probe probabilities
- :func:`choose_layer_and_report` select a layer on one half, report on the other
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Callable

import numpy as np
import torch

__all__ = [
    "wilson_interval",
    "rankdata",
    "auroc",
    "roc_curve",
    "spearman",
    "cohens_d",
    "bootstrap_ci",
    "stratified_folds",
    "fit_logistic",
    "logistic_probe_cv",
    "choose_layer_and_report",
]


# --------------------------------------------------------------------------- helpers


def _z_for_level(level: float) -> float:
    if not (0.0 < float(level) < 1.0):
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    return NormalDist().inv_cdf(1.0 - (1.0 - float(level)) / 2.0)


def _as_1d_float(x: Any, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _as_binary_labels(labels: Any, name: str = "labels") -> np.ndarray:
    """Boolean or 0/1 labels -> bool array; anything else is a ValueError."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be boolean or 0/1, got dtype {arr.dtype}")
    is_one = arr == 1
    ok = is_one | (arr == 0)
    if not ok.all():
        bad = np.flatnonzero(~ok)
        if arr.dtype.kind == "f" and np.isnan(arr).any():
            raise ValueError(
                f"{name} contain NaN (first at index {int(np.flatnonzero(np.isnan(arr))[0])})"
            )
        raise ValueError(
            f"{name} must be boolean or 0/1; found value {arr[bad[0]].item()!r} at index {int(bad[0])}"
        )
    return is_one


def _scores_and_labels(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    s = _as_1d_float(scores, "scores")
    y = _as_binary_labels(labels)
    if s.shape[0] != y.shape[0]:
        raise ValueError(
            f"length mismatch: scores has {s.shape[0]} entries, labels has {y.shape[0]}"
        )
    if np.isnan(s).any():
        raise ValueError(
            f"scores contain NaN (first at index {int(np.flatnonzero(np.isnan(s))[0])})"
        )
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        which = "positive" if n_pos == 0 else "negative"
        raise ValueError(
            f"only one class present in labels (no {which} examples; "
            f"{n_pos} positive, {n_neg} negative): AUROC is undefined"
        )
    return s, y


# --------------------------------------------------------------------------- intervals


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion k / n.

    Returns ``(nan, nan)`` when ``n == 0``. ``z`` is the two-sided normal quantile for
    ``level`` (1.959963984540054 for 0.95).
    """
    if isinstance(k, bool) or isinstance(n, bool):
        raise ValueError("k and n must be integers, not booleans")
    if int(k) != k or int(n) != n:
        raise ValueError(f"k and n must be integers, got k={k!r}, n={n!r}")
    k, n = int(k), int(n)
    z = _z_for_level(level)
    if n < 0:
        raise ValueError(f"n must be >= 0, got n={n}")
    if not (0 <= k <= n):
        raise ValueError(f"k must satisfy 0 <= k <= n, got k={k}, n={n}")
    if n == 0:
        return (math.nan, math.nan)
    p = k / n
    z2 = z * z
    denom = 1.0 + z2 / n
    centre = (p + z2 / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z2 / (4.0 * n * n)) / denom
    lo = 0.0 if k == 0 else max(0.0, centre - half)
    hi = 1.0 if k == n else min(1.0, centre + half)
    return (lo, hi)


# --------------------------------------------------------------------------- ranks / AUROC


def rankdata(x: Any) -> np.ndarray:
    """1-based ranks of a 1-D array; tied values get the average of their ranks."""
    a = np.asarray(x, dtype=np.float64).ravel()
    n = a.size
    if n == 0:
        return np.empty(0, dtype=np.float64)
    order = np.argsort(a, kind="mergesort")
    sorted_a = a[order]
    new_group = np.empty(n, dtype=bool)
    new_group[0] = True
    np.not_equal(sorted_a[1:], sorted_a[:-1], out=new_group[1:])
    group_id = np.cumsum(new_group) - 1  # per sorted position
    starts = np.flatnonzero(new_group)
    ends = np.append(starts[1:], n)  # exclusive
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(n, dtype=np.float64)
    ranks[order] = avg[group_id]
    return ranks


def auroc(scores: Any, labels: Any) -> float:
    """Area under the ROC curve: P(score of a random positive > random negative), ties 1/2.

    This is the Mann-Whitney U statistic (average ranks for ties) divided by
    n_pos * n_neg, computed by sorting the negatives and counting, for each positive,
    the negatives below it (plus half of those tied with it).
    ``labels`` are boolean or 0/1 (True / 1 = positive, e.g. misaligned).
    """
    s, y = _scores_and_labels(scores, labels)
    pos = s[y]
    neg = np.sort(s[~y])
    # for each positive: negatives strictly below (left) and at-or-below (right);
    # U = sum(#below + #tied / 2) = sum(left + right) / 2 (same as the rank-sum form)
    below = np.searchsorted(neg, pos, side="left")
    at_or_below = np.searchsorted(neg, pos, side="right")
    u = 0.5 * float(below.sum() + at_or_below.sum())
    return u / (pos.size * neg.size)


def roc_curve(scores: Any, labels: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve with tied scores grouped into a single step.

    Returns ``(fpr, tpr, thresholds)``; point i classifies ``score >= thresholds[i]`` as
    positive. The first point is (0, 0) with threshold +inf, the last is (1, 1) at the
    lowest score; thresholds are strictly descending. ``np.trapezoid(tpr, fpr)`` equals
    :func:`auroc` (a diagonal segment across a tie block is exactly the 1/2 credit).
    """
    s, y = _scores_and_labels(scores, labels)
    order = np.argsort(-s, kind="mergesort")
    s_sorted = s[order]
    y_sorted = y[order]
    # last index of each group of equal scores
    last = np.flatnonzero(np.append(s_sorted[1:] != s_sorted[:-1], True))
    tp = np.cumsum(y_sorted)[last]
    fp = (last + 1) - tp
    n_pos = tp[-1]
    n_neg = fp[-1]
    tpr = np.concatenate(([0.0], tp / n_pos))
    fpr = np.concatenate(([0.0], fp / n_neg))
    thresholds = np.concatenate(([np.inf], s_sorted[last]))
    return fpr, tpr, thresholds


# --------------------------------------------------------------------------- correlation / effect size


def spearman(x: Any, y: Any) -> float:
    """Spearman rank correlation: Pearson correlation of average ranks.

    NaN if either input is constant (or has fewer than 2 entries).
    """
    a = _as_1d_float(x, "x")
    b = _as_1d_float(y, "y")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"length mismatch: x has {a.shape[0]} entries, y has {b.shape[0]}")
    if np.isnan(a).any() or np.isnan(b).any():
        raise ValueError("x or y contains NaN")
    if a.size < 2:
        return math.nan
    ra = rankdata(a)
    rb = rankdata(b)
    ra -= ra.mean()
    rb -= rb.mean()
    denom = math.sqrt(float(ra @ ra) * float(rb @ rb))
    if denom == 0.0:
        return math.nan
    return float(np.clip(float(ra @ rb) / denom, -1.0, 1.0))


def cohens_d(a: Any, b: Any) -> float:
    """Cohen's d = (mean(b) - mean(a)) / pooled SD (ddof=1 within each group).

    Sign convention: **positive when b is larger**. Pass the aligned set as ``a`` and the
    misaligned set as ``b``, so a positive d means misaligned scores are higher.
    Each group needs at least 2 values. NaN when the pooled SD is 0.
    """
    x = _as_1d_float(a, "a")
    w = _as_1d_float(b, "b")
    if x.size < 2 or w.size < 2:
        raise ValueError(
            f"cohens_d needs at least 2 values in each group, got len(a)={x.size}, len(b)={w.size}"
        )
    if np.isnan(x).any() or np.isnan(w).any():
        raise ValueError("a or b contains NaN")
    na, nb = x.size, w.size
    pooled_var = ((na - 1) * x.var(ddof=1) + (nb - 1) * w.var(ddof=1)) / (na + nb - 2)
    if pooled_var <= 0.0:
        return math.nan
    return float((w.mean() - x.mean()) / math.sqrt(pooled_var))


# --------------------------------------------------------------------------- bootstrap


def _bootstrap_indices(
    n: int, n_boot: int, rng: np.random.Generator, stratify: np.ndarray | None
) -> np.ndarray:
    """[n_boot, n] resampling indices (within-class when ``stratify`` is given)."""
    if stratify is None:
        return rng.integers(0, n, size=(n_boot, n))
    classes = np.unique(stratify)
    parts = []
    for c in classes:
        members = np.flatnonzero(stratify == c)
        parts.append(members[rng.integers(0, members.size, size=(n_boot, members.size))])
    return np.concatenate(parts, axis=1)


def bootstrap_ci(
    statistic: Callable[..., float],
    *arrays: Any,
    n_boot: int = 2000,
    level: float = 0.95,
    seed: int = 0,
    stratify: Any = None,
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval for ``statistic(*arrays)``.

    Each resample draws n row indices with replacement and applies the *same* indices to
    every array (first axis), then calls ``statistic(*resampled)``. With ``stratify`` (a
    label array of length n) rows are resampled within each class separately, so every
    resample keeps the class counts: use it for AUROC, e.g.
    ``bootstrap_ci(auroc, scores, labels, stratify=labels)``.

    Resamples where the statistic raises ``ValueError`` or returns NaN are skipped; if
    more than half are skipped a ``ValueError`` is raised. Returns ``(lo, hi)``, the
    ``(1-level)/2`` and ``1-(1-level)/2`` quantiles of the bootstrap distribution.
    """
    if not arrays:
        raise ValueError("bootstrap_ci needs at least one array")
    _z_for_level(level)  # validates level
    if int(n_boot) < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    n_boot = int(n_boot)
    arrs = [np.asarray(a) for a in arrays]
    for i, a in enumerate(arrs):
        if a.ndim == 0:
            raise ValueError(f"array {i} is a scalar; bootstrap needs arrays with rows")
    n = arrs[0].shape[0]
    for i, a in enumerate(arrs[1:], start=1):
        if a.shape[0] != n:
            raise ValueError(
                f"length mismatch: array 0 has {n} rows, array {i} has {a.shape[0]}"
            )
    if n == 0:
        raise ValueError("bootstrap_ci got empty arrays")
    strat = None
    if stratify is not None:
        strat = np.asarray(stratify)
        if strat.ndim != 1 or strat.shape[0] != n:
            raise ValueError(
                f"length mismatch: stratify has shape {strat.shape}, arrays have {n} rows"
            )
    rng = np.random.default_rng(seed)
    idx = _bootstrap_indices(n, n_boot, rng, strat)
    values = np.empty(n_boot, dtype=np.float64)
    for b in range(n_boot):
        rows = idx[b]
        try:
            v = float(statistic(*(a[rows] for a in arrs)))
        except ValueError:
            v = math.nan
        values[b] = v
    ok = values[~np.isnan(values)]
    skipped = n_boot - ok.size
    if skipped * 2 > n_boot:
        raise ValueError(
            f"bootstrap: statistic failed (ValueError or NaN) on {skipped} of {n_boot} "
            "resamples (more than half); pass stratify= to keep every class in each resample"
        )
    alpha = (1.0 - float(level)) / 2.0
    lo, hi = np.quantile(ok, [alpha, 1.0 - alpha])
    return (float(lo), float(hi))


# --------------------------------------------------------------------------- logistic probe


def stratified_folds(labels: Any, folds: int = 5, seed: int = 0) -> np.ndarray:
    """Fold id (0..folds-1) for each row, stratified by class and seeded.

    Each class is shuffled with ``np.random.default_rng(seed)`` and dealt round-robin
    into the folds, so each fold gets ``floor`` or ``ceil`` of its share of every class.
    Raises ``ValueError`` if a class has fewer members than ``folds``.
    """
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {y.shape}")
    folds = int(folds)
    if folds < 2:
        raise ValueError(f"folds must be >= 2, got {folds}")
    classes, counts = np.unique(y, return_counts=True)
    if classes.size < 2:
        raise ValueError("only one class present in labels: cannot build stratified folds")
    for c, m in zip(classes, counts):
        if m < folds:
            raise ValueError(
                f"class {c!r} has only {m} members, fewer than folds={folds}: "
                "every fold needs at least one of each class (lower folds or add data)"
            )
    rng = np.random.default_rng(seed)
    fold_of = np.empty(y.size, dtype=np.int64)
    offset = 0
    for c in classes:
        members = np.flatnonzero(y == c)
        members = members[rng.permutation(members.size)]
        # continue the round-robin across classes so fold sizes stay balanced
        fold_of[members] = (np.arange(members.size) + offset) % folds
        offset += members.size
    return fold_of


def fit_logistic(
    X: Any, y: Any, l2: float = 1e-2, max_iter: int = 500
) -> tuple[np.ndarray, float]:
    """L2-regularised logistic regression, fitted with torch LBFGS in float64 on CPU.

    Minimises ``mean(BCE-with-logits(X @ w + b, y)) + (l2 / 2) * ||w||^2`` (bias not
    penalised), from w = 0, b = 0. Deterministic. Returns ``(w, b)``.
    """
    Xt = torch.as_tensor(np.asarray(X, dtype=np.float64), dtype=torch.float64)
    yt = torch.as_tensor(np.asarray(y, dtype=np.float64), dtype=torch.float64)
    if Xt.ndim != 2:
        raise ValueError(f"X must be 2-D [n, d], got shape {tuple(Xt.shape)}")
    if yt.ndim != 1 or yt.shape[0] != Xt.shape[0]:
        raise ValueError(
            f"length mismatch: X has {Xt.shape[0]} rows, y has shape {tuple(yt.shape)}"
        )
    d = Xt.shape[1]
    w = torch.zeros(d, dtype=torch.float64, requires_grad=True)
    b = torch.zeros((), dtype=torch.float64, requires_grad=True)
    # start the bias at the log prior odds: a better start, still deterministic
    p = float(yt.mean())
    if 0.0 < p < 1.0:
        with torch.no_grad():
            b.fill_(math.log(p / (1.0 - p)))
    opt = torch.optim.LBFGS(
        [w, b],
        lr=1.0,
        max_iter=int(max_iter),
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )
    lam = float(l2)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        logits = Xt @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, yt)
        loss = loss + 0.5 * lam * (w @ w)
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach().numpy().copy(), float(b.detach())


def logistic_probe_cv(
    X: Any, y: Any, folds: int = 5, seed: int = 0, l2: float = 1e-2
) -> np.ndarray:
    """Cross-validated out-of-fold probabilities of a logistic-regression probe.

    Folds come from :func:`stratified_folds` (seeded). For each fold the features are
    standardised with the *training* rows' mean and std only (std 0 -> 1), a
    :func:`fit_logistic` probe is fitted on the training rows, and the held-out rows get
    their predicted P(y = 1). Every row is scored by a model that never saw it, so
    ``auroc(logistic_probe_cv(X, y), y)`` is an honest cross-validated AUROC.
    """
    Xa = np.asarray(X, dtype=np.float64)
    if Xa.ndim == 1:
        Xa = Xa[:, None]
    if Xa.ndim != 2:
        raise ValueError(f"X must be 2-D [n, d], got shape {Xa.shape}")
    if np.isnan(Xa).any():
        raise ValueError("X contains NaN")
    yb = _as_binary_labels(y, "y")
    if yb.shape[0] != Xa.shape[0]:
        raise ValueError(
            f"length mismatch: X has {Xa.shape[0]} rows, y has {yb.shape[0]} entries"
        )
    fold_of = stratified_folds(yb, folds=folds, seed=seed)
    yf = yb.astype(np.float64)
    out = np.empty(Xa.shape[0], dtype=np.float64)
    for f in range(int(folds)):
        test = fold_of == f
        train = ~test
        mu = Xa[train].mean(axis=0)
        sd = Xa[train].std(axis=0)
        sd[sd == 0.0] = 1.0
        w, b = fit_logistic((Xa[train] - mu) / sd, yf[train], l2=l2)
        logits = ((Xa[test] - mu) / sd) @ w + b
        out[test] = 1.0 / (1.0 + np.exp(-logits))
    return out


# --------------------------------------------------------------------------- detection protocol


def choose_layer_and_report(
    scores_by_layer: Any,
    labels: Any,
    heldout_fraction: float = 0.5,
    seed: int = 0,
    n_boot: int = 2000,
    level: float = 0.95,
) -> dict:
    """Pick a layer on one half of the prompts and report its AUROC on the other half.

    Prompts are split, stratified by label and seeded, into a *selection* set and a
    *report* set (``heldout_fraction`` of each class goes to the report set). The layer
    with the highest selection AUROC (the first one on ties) is chosen; its AUROC on the
    report set is reported with a stratified percentile bootstrap CI, so the reported
    number is not inflated by the choice of layer.

    Returns a dict with ``layer``, ``selection_auroc``, ``report_auroc``, ``report_ci``
    (2-list), ``n_select``, ``n_report``, ``select_idx``, ``report_idx`` (sorted lists of
    ints), plus ``selection_aurocs`` (per-layer list) for plotting.
    """
    S = np.asarray(scores_by_layer, dtype=np.float64)
    if S.ndim != 2:
        raise ValueError(f"scores_by_layer must be 2-D [n_layers, n], got shape {S.shape}")
    y = _as_binary_labels(labels)
    if S.shape[1] != y.shape[0]:
        raise ValueError(
            f"length mismatch: scores_by_layer has {S.shape[1]} prompts per layer, "
            f"labels has {y.shape[0]}"
        )
    if S.shape[0] == 0:
        raise ValueError("scores_by_layer has no layers")
    nan_rows = np.flatnonzero(np.isnan(S).any(axis=1))
    if nan_rows.size:
        raise ValueError(f"scores contain NaN at layer {int(nan_rows[0])}")
    if not (0.0 < float(heldout_fraction) < 1.0):
        raise ValueError(f"heldout_fraction must be in (0, 1), got {heldout_fraction!r}")

    rng = np.random.default_rng(seed)
    select_parts, report_parts = [], []
    for cls in (False, True):
        members = np.flatnonzero(y == cls)
        name = "positive" if cls else "negative"
        if members.size < 2:
            raise ValueError(
                f"only {members.size} {name} example(s): need at least 2 of each class "
                "to split into selection and report sets"
            )
        members = members[rng.permutation(members.size)]
        n_rep = int(round(members.size * float(heldout_fraction)))
        n_rep = min(max(n_rep, 1), members.size - 1)
        report_parts.append(members[:n_rep])
        select_parts.append(members[n_rep:])
    select_idx = np.sort(np.concatenate(select_parts))
    report_idx = np.sort(np.concatenate(report_parts))

    y_sel = y[select_idx]
    sel_aurocs = []
    for layer in range(S.shape[0]):
        try:
            sel_aurocs.append(auroc(S[layer, select_idx], y_sel))
        except ValueError as exc:  # pragma: no cover - guarded above
            raise ValueError(f"layer {layer}: {exc}") from exc
    best = int(np.argmax(sel_aurocs))

    y_rep = y[report_idx]
    s_rep = S[best, report_idx]
    report_auroc = auroc(s_rep, y_rep)
    lo, hi = bootstrap_ci(
        auroc, s_rep, y_rep, n_boot=n_boot, level=level, seed=seed, stratify=y_rep
    )
    return {
        "layer": best,
        "selection_auroc": float(sel_aurocs[best]),
        "report_auroc": float(report_auroc),
        "report_ci": [lo, hi],
        "n_select": int(select_idx.size),
        "n_report": int(report_idx.size),
        "select_idx": [int(i) for i in select_idx],
        "report_idx": [int(i) for i in report_idx],
        "selection_aurocs": [float(a) for a in sel_aurocs],
    }
