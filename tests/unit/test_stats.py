"""Unit tests for core.stats (no model).

References are computed independently in the tests: the Wilson formula with an explicit z,
brute-force O(n^2) pair counts for AUROC, pandas' Spearman, hand-worked Cohen's d, scikit-learn's
weighted AUROC for the vectorised bootstrap, and coverage of bootstrap intervals on data whose
truth is known.
"""

from __future__ import annotations

import math
import re
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from core.stats import (
    auroc,
    auroc_ci,
    bootstrap_ci,
    bootstrap_counts,
    choose_layer_and_report,
    cohens_d,
    fit_probe,
    grouped_folds,
    grouped_split,
    percentile_in,
    roc_curve,
    spearman,
    wilson_interval,
)

Z95 = 1.959963984540054


# --------------------------------------------------------------------------- Wilson


def _wilson_reference(k: int, n: int, z: float) -> tuple[float, float]:
    p = k / n
    denom = 1 + z**2 / n
    centre = (p + z**2 / (2 * n)) / denom
    half = z / denom * math.sqrt(p * (1 - p) / n + z**2 / (4 * n**2))
    return centre - half, centre + half


@pytest.mark.parametrize(
    "k,n,expected",
    [
        (0, 10, (0.0, 0.2775)),
        (5, 10, (0.2366, 0.7634)),
        (10, 10, (0.7225, 1.0)),
        (3, 20, (0.0524, 0.3604)),
    ],
)
def test_wilson_matches_hand_computation(k, n, expected):
    ref = _wilson_reference(k, n, Z95)
    got = wilson_interval(k, n)
    assert got[0] == pytest.approx(ref[0], abs=1e-12)
    assert got[1] == pytest.approx(ref[1], abs=1e-12)
    # and the literal 4-decimal values worked out by hand
    assert round(got[0], 4) == pytest.approx(expected[0], abs=1e-12)
    assert round(got[1], 4) == pytest.approx(expected[1], abs=1e-12)


def test_wilson_other_level_and_edges():
    z90 = 1.6448536269514722
    ref = _wilson_reference(7, 25, z90)
    got = wilson_interval(7, 25, level=0.90)
    assert got == pytest.approx(ref, abs=1e-12)
    # k = 0 and k = n are clamped exactly to the boundary
    assert wilson_interval(0, 3)[0] == 0.0
    assert wilson_interval(3, 3)[1] == 1.0
    lo, hi = wilson_interval(0, 0)
    assert math.isnan(lo) and math.isnan(hi)


@pytest.mark.parametrize(
    "k,n,message",
    [
        (11, 10, "k must satisfy 0 <= k <= n, got k=11, n=10"),
        (-1, 10, "k must satisfy 0 <= k <= n, got k=-1, n=10"),
        (0, -1, "n must be >= 0, got n=-1"),
        (1.5, 10, "k and n must be integers, got k=1.5, n=10"),
    ],
)
def test_wilson_rejects_bad_counts(k, n, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        wilson_interval(k, n)


def test_wilson_rejects_bad_level():
    with pytest.raises(ValueError, match="level"):
        wilson_interval(1, 10, level=1.5)


# --------------------------------------------------------------------------- AUROC / ROC


def _auroc_brute(scores: np.ndarray, labels: np.ndarray) -> float:
    pos = scores[labels.astype(bool)]
    neg = scores[~labels.astype(bool)]
    total = 0.0
    for p in pos:
        for q in neg:
            total += 1.0 if p > q else (0.5 if p == q else 0.0)
    return total / (pos.size * neg.size)


@pytest.mark.parametrize("seed", range(25))
def test_auroc_matches_bruteforce_with_ties(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(5, 80))
    labels = rng.integers(0, 2, size=n)
    labels[0], labels[1] = 0, 1  # both classes present
    # coarse integer scores -> lots of ties, shifted for positives on half the seeds
    shift = 1.0 if seed % 2 else 0.0
    scores = np.round(rng.normal(size=n) * 2 + shift * labels)
    ref = _auroc_brute(scores, labels)
    assert auroc(scores, labels) == pytest.approx(ref, abs=1e-12)
    assert auroc(scores, labels.astype(bool)) == pytest.approx(ref, abs=1e-12)
    fpr, tpr, thr = roc_curve(scores, labels)
    assert np.trapezoid(tpr, fpr) == pytest.approx(ref, abs=1e-12)


def test_auroc_extremes_and_all_tied():
    labels = np.array([0, 0, 0, 1, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])
    assert auroc(scores, labels) == 1.0
    assert auroc(-scores, labels) == 0.0
    assert auroc(np.zeros(6), labels) == 0.5


def test_roc_curve_shape():
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 2, size=200)
    scores = np.round(rng.normal(size=200) + labels, 1)
    fpr, tpr, thr = roc_curve(scores, labels)
    assert (fpr[0], tpr[0]) == (0.0, 0.0)
    assert (fpr[-1], tpr[-1]) == (1.0, 1.0)
    assert np.isinf(thr[0]) and thr[0] > 0
    assert np.all(np.diff(thr) < 0), "thresholds strictly descending, ties grouped"
    assert thr.size == np.unique(scores).size + 1
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(tpr) >= 0)
    # each point: rate of score >= threshold within each class
    for i in (1, thr.size // 2, thr.size - 1):
        pred = scores >= thr[i]
        assert tpr[i] == pytest.approx(pred[labels == 1].mean())
        assert fpr[i] == pytest.approx(pred[labels == 0].mean())
    assert np.trapezoid(tpr, fpr) == pytest.approx(auroc(scores, labels), abs=1e-12)


@pytest.mark.parametrize("fn", [auroc, roc_curve])
def test_auroc_bad_input_errors(fn):
    with pytest.raises(ValueError, match="one class"):
        fn([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="one class"):
        fn([0.1, 0.2, 0.3], [False, False, False])
    with pytest.raises(ValueError, match="NaN"):
        fn([0.1, float("nan"), 0.3], [0, 1, 1])
    with pytest.raises(ValueError, match="length mismatch"):
        fn([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="0/1"):
        fn([0.1, 0.2, 0.3], [0, 1, 2])


# --------------------------------------------------------------------------- Spearman / ranks


@pytest.mark.parametrize("seed", range(15))
def test_spearman_matches_pandas_with_ties(seed):
    rng = np.random.default_rng(100 + seed)
    n = int(rng.integers(5, 120))
    x = rng.integers(0, 6, size=n).astype(float)
    y = np.round(x * 0.5 + rng.normal(size=n), 0)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        pytest.skip("constant draw")
    # Series.corr(method="spearman") needs scipy; DataFrame.corr has its own ranking.
    ref = pd.DataFrame({"x": x, "y": y}).corr(method="spearman").loc["x", "y"]
    assert spearman(x, y) == pytest.approx(ref, abs=1e-12)


def test_spearman_constant_monotone_and_errors():
    assert math.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4]))
    assert math.isnan(spearman([1, 2, 3, 4], [7, 7, 7, 7]))
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="length mismatch"):
        spearman([1, 2, 3], [1, 2])
    with pytest.raises(ValueError, match="NaN"):
        spearman([1, 2, float("nan")], [1, 2, 3])


# --------------------------------------------------------------------------- Cohen's d


def test_cohens_d_hand_computation_and_sign():
    a = [1.0, 2.0, 3.0, 4.0]  # mean 2.5, var (ddof=1) 5/3
    b = [3.0, 4.0, 5.0, 6.0, 7.0]  # mean 5, var 2.5
    pooled_sd = math.sqrt((3 * (5 / 3) + 4 * 2.5) / 7)  # sqrt(15 / 7)
    expected = (5.0 - 2.5) / pooled_sd  # 1.70782...
    assert cohens_d(a, b) == pytest.approx(expected, rel=1e-12)
    assert cohens_d(a, b) == pytest.approx(1.7078, abs=1e-4)
    assert cohens_d(b, a) == pytest.approx(-expected, rel=1e-12)  # positive when b larger
    assert math.isnan(cohens_d([2, 2, 2], [2, 2]))
    with pytest.raises(ValueError, match="at least 2"):
        cohens_d([1.0], [1.0, 2.0])


# --------------------------------------------------------------------------- bootstrap


def test_bootstrap_deterministic_and_paired_indices():
    rng = np.random.default_rng(0)
    x = rng.normal(size=40)
    y = 2 * x

    def paired(a, b):
        # same indices across arrays -> the pairing survives every resample
        assert np.array_equal(b, 2 * a)
        return float(a.mean())

    ci1 = bootstrap_ci(paired, x, y, n_boot=300, seed=5)
    ci2 = bootstrap_ci(paired, x, y, n_boot=300, seed=5)
    ci3 = bootstrap_ci(paired, x, y, n_boot=300, seed=6)
    assert ci1 == ci2
    assert ci1 != ci3
    assert ci1[0] < x.mean() < ci1[1]


def test_bootstrap_stratify_keeps_class_counts():
    labels = np.array([0] * 17 + [1] * 3)
    scores = np.arange(20, dtype=float)
    seen = []

    def stat(s, y):
        seen.append(int(y.sum()))
        return auroc(s, y)

    bootstrap_ci(stat, scores, labels, n_boot=200, stratify=labels)
    assert set(seen) == {3}


def test_bootstrap_skips_failed_resamples_and_raises_if_most_fail():
    # 1 positive in 20: ~36% of unstratified resamples lack it -> skipped, not fatal
    labels = np.array([0] * 19 + [1])
    scores = np.linspace(0, 1, 20)
    lo, hi = bootstrap_ci(auroc, scores, labels, n_boot=300, seed=1)
    assert lo == hi == 1.0
    # statistic that is NaN on every resample -> error
    with pytest.raises(ValueError, match="more than half"):
        bootstrap_ci(lambda a: float("nan"), scores, n_boot=50)

    # statistic that raises ValueError on every resample -> error
    def bad(a):
        raise ValueError("nope")

    with pytest.raises(ValueError, match="more than half"):
        bootstrap_ci(bad, scores, n_boot=50)
    # partial failures: only the successful resamples enter the percentiles
    grid = np.linspace(0, 1, 101)  # resampled means: 0.5 +- 0.029

    def mean_if_high(cut):
        def stat(a):
            if a.mean() < cut:
                raise ValueError("low")
            return float(a.mean())

        return stat

    lo, hi = bootstrap_ci(mean_if_high(0.485), grid, n_boot=400, seed=2)  # ~30% skipped
    assert 0.485 <= lo < hi
    with pytest.raises(ValueError, match="more than half"):
        bootstrap_ci(mean_if_high(0.515), grid, n_boot=400, seed=2)  # ~70% skipped


def test_bootstrap_length_mismatch():
    with pytest.raises(ValueError, match="length mismatch"):
        bootstrap_ci(lambda a, b: 0.0, np.zeros(5), np.zeros(4))
    with pytest.raises(ValueError, match="length mismatch"):
        bootstrap_ci(lambda a: 0.0, np.zeros(5), stratify=np.zeros(4))


def test_bootstrap_coverage_mean():
    rng = np.random.default_rng(2024)
    mu, reps, covered = 1.3, 200, 0
    for r in range(reps):
        x = rng.normal(mu, 2.0, size=50)
        lo, hi = bootstrap_ci(np.mean, x, n_boot=500, seed=r)
        covered += lo <= mu <= hi
    rate = covered / reps
    assert 0.88 <= rate <= 0.99, rate


def test_bootstrap_coverage_auroc():
    delta = 1.0
    truth = NormalDist().cdf(delta / math.sqrt(2))  # 0.7602
    rng = np.random.default_rng(7)
    labels = np.array([0] * 50 + [1] * 50)
    reps, covered = 200, 0
    for r in range(reps):
        scores = np.concatenate([rng.normal(0, 1, 50), rng.normal(delta, 1, 50)])
        lo, hi = auroc_ci(scores, labels, n_boot=300, seed=r)
        covered += lo <= truth <= hi
    rate = covered / reps
    assert 0.88 <= rate <= 0.99, rate


def test_bootstrap_counts_resample_whole_groups_within_strata():
    groups = np.repeat(np.arange(12), 3)  # 12 groups of 3 rows
    labels = np.repeat([0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1], 3)
    labels[-1] = 0  # the last group is mixed
    counts = bootstrap_counts(36, 400, seed=3, groups=groups, stratify=labels)
    assert counts.shape == (400, 36)
    assert np.all(counts.reshape(400, 12, 3) == counts.reshape(400, 12, 3)[:, :, :1])  # a group moves as one
    per_group = counts.reshape(400, 12, 3)[:, :, 0]
    assert np.all(per_group[:, :7].sum(1) == 7)  # 7 all-aligned groups drawn among themselves
    assert np.all(per_group[:, 7:11].sum(1) == 4) and np.all(per_group[:, 11] == 1)  # 4 all-misaligned, 1 mixed
    assert np.array_equal(counts, bootstrap_counts(36, 400, seed=3, groups=groups, stratify=labels))
    assert np.all(bootstrap_counts(10, 50, seed=0).sum(1) == 10)  # no groups: rows, n per resample


def test_bootstrap_ci_with_groups_passes_whole_groups():
    groups = np.repeat(np.arange(8), 4)
    values = groups.astype(float)
    seen = []

    def stat(v, g):
        assert np.array_equal(v, g)  # the same rows in every array
        seen.append(np.bincount(g.astype(int), minlength=8) % 4)
        return float(v.mean())

    bootstrap_ci(stat, values, groups.astype(float), n_boot=100, groups=groups)
    assert not np.any(seen)  # every group came with all 4 of its rows


@pytest.mark.parametrize("seed", range(5))
def test_auroc_ci_resamples_are_weighted_aurocs(seed):
    """The vectorised bootstrap computes, per resample, what scikit-learn computes with the multiplicities
    as sample weights; its interval is the percentile interval of those values."""
    rng = np.random.default_rng(seed)
    n = 40
    labels = rng.permutation(np.r_[np.zeros(20), np.ones(20)]).astype(bool)
    scores = np.round(rng.normal(size=n) + labels, 1)  # ties
    groups = rng.integers(0, 15, size=n)
    counts = bootstrap_counts(n, 50, seed=seed, groups=groups)
    reference = [roc_auc_score(labels, scores, sample_weight=w) for w in counts if w[labels].sum() and w[~labels].sum()]
    lo, hi = auroc_ci(scores, labels, groups, n_boot=50, seed=seed)
    assert lo == pytest.approx(np.quantile(reference, 0.025), abs=1e-12)
    assert hi == pytest.approx(np.quantile(reference, 0.975), abs=1e-12)


def test_grouped_folds_keep_groups_whole_and_balance_classes():
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 3)
    labels = np.repeat(rng.permutation(np.r_[np.zeros(20), np.ones(20)]), 3)
    folds = grouped_folds(labels, groups, folds=5, seed=1)
    for g in range(40):
        assert len(set(folds[groups == g])) == 1
    for f in range(5):
        assert labels[folds == f].sum() == 12 and (folds == f).sum() == 24  # 4 of 8 groups misaligned
    assert np.array_equal(folds, grouped_folds(labels, groups, folds=5, seed=1))
    with pytest.raises(ValueError, match="fewer than folds"):
        grouped_folds(labels[:9], groups[:9], folds=5)


def test_grouped_split_keeps_groups_whole_in_both_halves():
    groups = np.repeat(np.arange(30), 2)
    labels = np.repeat(np.arange(30) % 3 == 0, 2)
    select, report = grouped_split(labels, groups, 0.5, seed=0)
    assert set(groups[select]).isdisjoint(groups[report])
    assert sorted(np.r_[select, report]) == list(range(60))
    assert abs(len(report) - 30) <= 2 and labels[report].any() and labels[select].any()
    _, small = grouped_split(labels, groups, 0.2, seed=0)  # one fold of five
    assert len(set(groups[small])) == 6
    select_big, _ = grouped_split(labels, groups, 0.8, seed=0)  # four folds of five in the report set
    assert len(set(groups[select_big])) == 6
    with pytest.raises(ValueError, match="only aligned"):
        grouped_split(np.r_[np.ones(2), np.zeros(58)].astype(bool), groups, 0.5)


def test_percentile_in_counts_ties_half():
    null = np.arange(1, 101) / 100  # 0.01 .. 1.00
    assert percentile_in(0.505, null) == pytest.approx(50.0)
    assert percentile_in(0.50, null) == pytest.approx(49.5)
    assert percentile_in(2.0, null) == 100.0 and percentile_in(-1.0, null) == 0.0


# --------------------------------------------------------------------------- logistic probe


def test_probe_separable_data_on_new_rows():
    rng = np.random.default_rng(0)
    w = rng.normal(size=20)
    X = rng.normal(size=(300, 20))
    keep = np.abs(X @ w) > 0.5  # a clear margin
    X, y = X[keep], X[keep] @ w > 0
    model = fit_probe(X[:120], y[:120], seed=0)
    p = model.predict_proba(X[120:])[:, 1]
    assert np.all((p > 0) & (p < 1)) and auroc(p, y[120:]) > 0.95
    again = fit_probe(X[:120], y[:120], seed=0).predict_proba(X[120:])[:, 1]
    assert np.array_equal(p, again)


def test_probe_errors():
    X = np.zeros((12, 2))
    with pytest.raises(ValueError, match="one class"):
        fit_probe(X, np.zeros(12))
    with pytest.raises(ValueError, match="length mismatch"):
        fit_probe(X, np.array([0, 1] * 5))
    Xn = np.ones((12, 2))
    Xn[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fit_probe(Xn, np.array([0, 1] * 6))


# --------------------------------------------------------------------------- layer-selection protocol


def test_choose_layer_finds_planted_layer():
    rng = np.random.default_rng(0)
    n_layers, n, planted = 10, 120, 6
    labels = rng.permutation(np.array([0] * 60 + [1] * 60))
    groups = np.arange(n) // 2
    S = rng.normal(size=(n_layers, n))
    S[planted] += 1.5 * labels
    select, report = grouped_split(labels, groups, 0.5, seed=0)
    out = choose_layer_and_report(S, labels, select, report, groups, n_boot=500)
    assert out["layer"] == planted
    assert out["selection_auroc"] > 0.8 and out["report_auroc"] > 0.75
    lo, hi = out["report_ci"]
    assert isinstance(out["report_ci"], list) and lo < out["report_auroc"] < hi
    assert out["n_select"] == len(select) and out["n_report"] == len(report)
    # each figure is measured on its own set only
    assert out["selection_auroc"] == pytest.approx(auroc(S[planted, select], labels[select]))
    assert out["report_auroc"] == pytest.approx(auroc(S[planted, report], labels[report]))
    assert out["selection_aurocs"] == [auroc(S[k, select], labels[select]) for k in range(n_layers)]
    assert out == choose_layer_and_report(S, labels, select, report, groups, n_boot=500)


def test_choose_layer_noise_only_reports_chance():
    # the point of the held-out set: picking the best of 30 noise layers inflates the selection
    # AUROC, while the report set does not share that optimism
    sel, rep = [], []
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        labels = rng.permutation(np.array([0] * 40 + [1] * 40))
        S = rng.normal(size=(30, 80))
        select, report = grouped_split(labels, None, 0.5, seed=seed)
        out = choose_layer_and_report(S, labels, select, report, n_boot=100)
        sel.append(out["selection_auroc"])
        rep.append(out["report_auroc"])
    assert np.mean(sel) > 0.6  # optimistic: max of 30 chance AUROCs on 40 prompts
    assert abs(np.mean(rep) - 0.5) < 0.04  # honest: sd of the mean is about 0.01


def test_choose_layer_errors():
    labels = np.array([0, 1] * 10)
    S = np.zeros((3, 20))
    select, report = np.arange(10), np.arange(10, 20)
    with pytest.raises(ValueError, match="length mismatch"):
        choose_layer_and_report(S, labels[:-1], select, report)
    S_nan = np.random.default_rng(0).normal(size=(3, 20))
    S_nan[2, 4] = np.nan
    with pytest.raises(ValueError, match="NaN at layer 2"):
        choose_layer_and_report(S_nan, labels, select, report)
    with pytest.raises(ValueError, match="both the selection and the report"):
        choose_layer_and_report(S, labels, select, report, groups=np.arange(20) % 10)
