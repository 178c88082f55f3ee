"""The detection protocol on simulations whose truth is known (no model; seconds).

Each test first shows that the naive protocol is fooled by its simulation (in-sample statistics,
rows split or resampled as if paraphrases of one question were independent), then that the
protocol EM Lens uses is not."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from core.directions import AnswerActivations, Direction, direction_from_sets
from core.preference import best_layer
from core.stats import auroc, auroc_ci, fit_probe


def noise_sets(n: int, n_layers: int, width: int, seed: int) -> tuple[AnswerActivations, AnswerActivations]:
    """Two answer sets of pure Gaussian noise, one vector per answer (the review's setting)."""
    generator = torch.Generator().manual_seed(seed)

    def one() -> AnswerActivations:
        return AnswerActivations(torch.randn(n, n_layers, width, generator=generator), torch.ones(n))

    return one(), one()


def test_crossfit_statistics_are_chance_on_noise_while_in_sample_ones_are_not():
    aligned, misaligned = noise_sets(300, 8, 576, seed=0)
    stats = direction_from_sets(aligned, misaligned, {}).stats
    crossfit = np.array([s["auroc"] for s in stats])
    insample = np.array([s["auroc_insample"] for s in stats])
    assert insample.mean() > 0.9  # the review's figure: a mean difference fits noise in 576 dimensions
    assert abs(crossfit.mean() - 0.5) < 0.05 and np.all(np.abs(crossfit - 0.5) < 0.12)
    assert np.mean([s["cohens_d_insample"] for s in stats]) > 1.5
    assert abs(np.mean([s["cohens_d"] for s in stats])) < 0.15


def test_crossfit_keeps_a_real_signal():
    aligned, misaligned = noise_sets(100, 2, 64, seed=1)
    misaligned.sums[:, 1, 0] += 2.0  # a true shift of 2 SD along one axis at layer 1 (AUROC about 0.88)
    stats = direction_from_sets(aligned, misaligned, {}).stats
    assert stats[1]["auroc"] > 0.78 and stats[1]["cohens_d"] > 1.2
    assert abs(stats[0]["auroc"] - 0.5) < 0.15


def test_crossfit_folds_respect_groups():
    """Judged-style sets: misaligned answers come from some questions, aligned from others, each question
    with its own offset and no alignment signal at all. Folds of single answers put a question's other
    samples into training, so its offset 'predicts' the label; folds of whole questions do not."""
    rng = np.random.default_rng(2)
    n_questions, samples, width = 40, 8, 128
    offsets = rng.normal(size=(n_questions, width)) * 1.5
    bad = rng.permutation(np.arange(n_questions) < 20)
    question = np.repeat(np.arange(n_questions), samples)
    acts = offsets[question] + rng.normal(size=(len(question), width))
    sets = [
        AnswerActivations(
            torch.tensor(acts[bad[question] == b], dtype=torch.float32)[:, None, :],
            torch.ones(int((bad[question] == b).sum())),
        )
        for b in (False, True)
    ]
    groups = np.r_[question[~bad[question]], question[bad[question]]]
    ungrouped = direction_from_sets(*sets, {}).stats[0]["auroc"]
    grouped = direction_from_sets(*sets, {}, groups=groups).stats[0]["auroc"]
    assert ungrouped > 0.8
    assert abs(grouped - 0.5) < 0.15


def test_best_layer_uses_the_crossfitted_figure():
    """Layer 0: isotropic noise in 576 dimensions (in-sample d huge, nothing real). Layer 1: a real
    shift of 0.8 SD, noise in only 4 dimensions (in-sample d barely above the truth)."""
    aligned, misaligned = noise_sets(24, 2, 576, seed=3)
    for s in (aligned, misaligned):
        s.sums[:, 1, 4:] = 0
    misaligned.sums[:, 1, 0] += 0.8
    direction = direction_from_sets(aligned, misaligned, {})
    insample = [s["cohens_d_insample"] for s in direction.stats]
    assert insample[0] > insample[1]  # the in-sample choice would be the noise layer
    assert best_layer(direction) == 1
    old = Direction(
        direction.vectors, {}, [{k: v for k, v in s.items() if not k.endswith("_insample")} for s in direction.stats]
    )
    with pytest.raises(ValueError, match="in-sample only"):
        best_layer(old)


def clustered(rng, n_groups: int, per_group: int, width: int = 1, propensity=None):
    """Questions with paraphrases: scores (or features) share a question effect, labels share a question
    propensity, and the two are independent, so the true AUROC is exactly 0.5."""
    group = np.repeat(np.arange(n_groups), per_group)
    scores = rng.normal(size=(n_groups, width))[group] + 0.5 * rng.normal(size=(len(group), width))
    if propensity is None:
        propensity = rng.uniform(0.05, 0.95, size=n_groups)
    labels = rng.uniform(size=len(group)) < propensity[group]
    return scores, labels, group


def test_grouped_intervals_cover_chance_at_the_nominal_rate():
    rng = np.random.default_rng(4)
    reps, grouped, naive = 300, 0, 0
    for r in range(reps):
        scores, labels, group = clustered(rng, 40, 8)  # 40 questions, 8 paraphrases each
        scores = scores[:, 0]
        lo, hi = auroc_ci(scores, labels, group, n_boot=400, seed=r)
        grouped += lo <= 0.5 <= hi
        lo, hi = auroc_ci(scores, labels, None, n_boot=400, seed=r)
        naive += lo <= 0.5 <= hi
    assert naive / reps < 0.85  # the review's finding: paraphrases taken as independent undercover
    assert abs(grouped / reps - 0.95) <= 0.05, grouped / reps


def test_grouped_probe_scores_chance_on_new_questions():
    """Topic features identify the question, and labels cluster by question. A probe fitted on 40
    questions (its strength chosen by grouped cross-validation) reads the topic: it 'predicts' new
    paraphrases of those questions, which is what rows split as if independent would report. On
    new questions it scores chance."""
    rng = np.random.default_rng(5)
    n_fit = 40
    X, y, group = clustered(rng, 440, 5, width=256, propensity=rng.choice([0.1, 0.9], size=440))
    paraphrase = np.tile(np.arange(5), 440)
    fit = (group < n_fit) & (paraphrase < 4)
    probe = fit_probe(X[fit], y[fit], group[fit], seed=0)
    seen = (group < n_fit) & (paraphrase == 4)
    new = group >= n_fit
    assert auroc(probe.predict_proba(X[seen])[:, 1], y[seen]) > 0.75
    assert abs(auroc(probe.predict_proba(X[new])[:, 1], y[new]) - 0.5) < 0.05
