"""Unit tests for core.stats (no model, no scipy / sklearn).

References are computed independently in the tests: the Wilson formula with an explicit
z, brute-force O(n^2) pair counts for AUROC, pandas' Spearman, hand-worked Cohen's d, and
coverage of bootstrap intervals on data whose truth is known.
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pandas as pd
import pytest

from core.stats import (
    auroc,
    bootstrap_ci,
    choose_layer_and_report,
    cohens_d,
    fit_logistic,
    logistic_probe_cv,
    rankdata,
    roc_curve,
    spearman,
    stratified_folds,
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


@pytest.mark.parametrize("k,n", [(11, 10), (-1, 10), (0, -1)])
def test_wilson_rejects_bad_counts(k, n):
    with pytest.raises(ValueError, match=r"k|n"):
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


def test_rankdata_average_ties():
    assert rankdata([10, 20, 20, 5, 20]).tolist() == [2.0, 4.0, 4.0, 1.0, 4.0]


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
    grid = np.linspace(0, 1, 101)

    def first_if_high(cut):
        def stat(a):
            if a[0] < cut:
                raise ValueError("low")
            return float(a[0])

        return stat

    lo, hi = bootstrap_ci(first_if_high(0.3), grid, n_boot=400, seed=2)  # ~30% skipped
    assert 0.3 <= lo < hi <= 1.0
    with pytest.raises(ValueError, match="more than half"):
        bootstrap_ci(first_if_high(0.7), grid, n_boot=400, seed=2)  # ~70% skipped


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
        lo, hi = bootstrap_ci(auroc, scores, labels, n_boot=300, seed=r, stratify=labels)
        covered += lo <= truth <= hi
    rate = covered / reps
    assert 0.88 <= rate <= 0.99, rate


# --------------------------------------------------------------------------- logistic probe


def test_probe_separable_data_high_auroc():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(200, 20))
    w = rng.normal(size=20)
    margin = X @ w
    keep = np.abs(margin) > 0.5  # a clear margin
    X, y = X[keep], (margin[keep] > 0).astype(int)
    p = logistic_probe_cv(X, y, folds=5, seed=0)
    assert p.shape == (X.shape[0],)
    assert np.all((p > 0) & (p < 1))
    assert auroc(p, y) > 0.95
    # deterministic given the seed
    assert np.array_equal(p, logistic_probe_cv(X, y, folds=5, seed=0))


def test_probe_noise_labels_near_chance():
    rng = np.random.default_rng(1)
    X = rng.normal(size=(120, 30))
    y = rng.permutation(np.array([0] * 60 + [1] * 60))
    a = auroc(logistic_probe_cv(X, y, seed=0), y)
    assert 0.3 < a < 0.7, a


def test_probe_no_leakage_row_id_features():
    # One-hot row ids: a model that saw the test rows memorises them (AUROC 1); with
    # honest folds the held-out row's id column was never seen -> chance.
    rng = np.random.default_rng(2)
    n = 60
    X = np.eye(n)
    y = rng.permutation(np.array([0] * 30 + [1] * 30))
    w, b = fit_logistic((X - X.mean(0)) / X.std(0), y, l2=1e-2)
    in_sample = auroc(((X - X.mean(0)) / X.std(0)) @ w + b, y)
    assert in_sample > 0.99  # the leak this test would catch is real
    oof = auroc(logistic_probe_cv(X, y, folds=5, seed=0), y)
    assert 0.3 < oof < 0.7, oof


def test_probe_matches_manual_fold_fit():
    # the out-of-fold score of fold f uses only the other folds (mean/std and weights)
    rng = np.random.default_rng(3)
    X = rng.normal(size=(90, 6)) * np.array([1, 10, 0.1, 3, 1, 1]) + 5
    y = (X[:, 0] + rng.normal(size=90) > 5).astype(int)
    p = logistic_probe_cv(X, y, folds=4, seed=11, l2=0.05)
    fold_of = stratified_folds(y, folds=4, seed=11)
    for f in range(4):
        test = fold_of == f
        # each fold holds both classes, sizes balanced
        assert 0 < y[test].sum() < test.sum()
        tr = ~test
        mu, sd = X[tr].mean(0), X[tr].std(0)
        w, b = fit_logistic((X[tr] - mu) / sd, y[tr], l2=0.05)
        expect = 1 / (1 + np.exp(-(((X[test] - mu) / sd) @ w + b)))
        np.testing.assert_allclose(p[test], expect, rtol=1e-10, atol=1e-12)
    # changing only the held-out rows' features does not change the model used for them
    X2 = X.copy()
    X2[fold_of == 0] *= 3.0
    p2 = logistic_probe_cv(X2, y, folds=4, seed=11, l2=0.05)
    tr = fold_of != 0
    mu, sd = X[tr].mean(0), X[tr].std(0)
    w, b = fit_logistic((X[tr] - mu) / sd, y[tr], l2=0.05)
    expect = 1 / (1 + np.exp(-(((X2[fold_of == 0] - mu) / sd) @ w + b)))
    np.testing.assert_allclose(p2[fold_of == 0], expect, rtol=1e-10, atol=1e-12)


def test_stratified_folds_balanced():
    y = np.array([0] * 23 + [1] * 12)
    f = stratified_folds(y, folds=5, seed=0)
    for k in range(5):
        assert y[f == k].sum() in (2, 3)
        assert (f == k).sum() in (7, 8)
    assert np.array_equal(f, stratified_folds(y, folds=5, seed=0))


def test_probe_errors():
    X = np.zeros((12, 2))
    y = np.array([0] * 9 + [1] * 3)
    with pytest.raises(ValueError, match="fewer than folds"):
        logistic_probe_cv(X, y, folds=5)
    with pytest.raises(ValueError, match="one class"):
        logistic_probe_cv(X, np.zeros(12), folds=2)
    with pytest.raises(ValueError, match="length mismatch"):
        logistic_probe_cv(X, np.array([0, 1] * 5), folds=2)
    Xn = np.ones((12, 2))
    Xn[0, 1] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        logistic_probe_cv(Xn, np.array([0, 1] * 6), folds=2)


# --------------------------------------------------------------------------- detection protocol


def test_choose_layer_finds_planted_layer():
    rng = np.random.default_rng(0)
    n_layers, n, planted = 10, 120, 6
    labels = rng.permutation(np.array([0] * 60 + [1] * 60))
    S = rng.normal(size=(n_layers, n))
    S[planted] += 1.5 * labels
    out = choose_layer_and_report(S, labels, heldout_fraction=0.5, seed=0, n_boot=500)
    assert out["layer"] == planted
    assert out["selection_auroc"] > 0.8
    assert out["report_auroc"] > 0.75
    lo, hi = out["report_ci"]
    assert isinstance(out["report_ci"], list) and lo < out["report_auroc"] < hi
    sel, rep = set(out["select_idx"]), set(out["report_idx"])
    assert sel.isdisjoint(rep)
    assert sel | rep == set(range(n))
    assert out["n_select"] == len(sel) == 60 and out["n_report"] == len(rep) == 60
    assert all(isinstance(i, int) for i in out["select_idx"] + out["report_idx"])
    # stratified split: both halves balanced
    assert labels[out["report_idx"]].sum() == 30
    # selection AUROC is really measured on the selection half only
    assert out["selection_auroc"] == pytest.approx(
        auroc(S[planted, out["select_idx"]], labels[out["select_idx"]])
    )
    assert out["report_auroc"] == pytest.approx(
        auroc(S[planted, out["report_idx"]], labels[out["report_idx"]])
    )
    assert out == choose_layer_and_report(S, labels, seed=0, n_boot=500)


def test_choose_layer_noise_only_reports_chance():
    # the point of the held-out half: picking the best of 30 noise layers inflates the
    # selection AUROC, while the report half does not share that optimism
    sel, rep = [], []
    for seed in range(40):
        rng = np.random.default_rng(1000 + seed)
        labels = rng.permutation(np.array([0] * 40 + [1] * 40))
        S = rng.normal(size=(30, 80))
        out = choose_layer_and_report(S, labels, seed=seed, n_boot=100)
        sel.append(out["selection_auroc"])
        rep.append(out["report_auroc"])
    assert np.mean(sel) > 0.6  # optimistic: max of 30 chance AUROCs on 40 prompts
    assert abs(np.mean(rep) - 0.5) < 0.04  # honest: sd of the mean is about 0.01


def test_choose_layer_errors():
    labels = np.array([0, 1] * 10)
    S = np.zeros((3, 20))
    with pytest.raises(ValueError, match="length mismatch"):
        choose_layer_and_report(S, labels[:-1])
    S_nan = np.random.default_rng(0).normal(size=(3, 20))
    S_nan[2, 4] = np.nan
    with pytest.raises(ValueError, match="NaN at layer 2"):
        choose_layer_and_report(S_nan, labels)
    with pytest.raises(ValueError, match="need at least 2 of each class"):
        choose_layer_and_report(S, np.array([1] + [0] * 19))
