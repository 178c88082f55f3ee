"""How the Directions page shows a direction's per-layer separation: cross-fitted where the file has
it, the in-sample figure beside it, and an older file's in-sample-only figures named as such."""

from core.directions import describe_separation
from core.plots import direction_stats_figure

CURRENT = [
    {"layer": i, "norm": 1.0 + i, "auroc": 0.6, "cohens_d": 0.3, "auroc_insample": 0.9, "cohens_d_insample": 2.0}
    for i in range(3)
]
OLDER = [{"layer": i, "norm": 1.0 + i, "auroc": 0.9, "cohens_d": 2.0} for i in range(3)]
UNCROSSED = [{**s, "auroc": None, "cohens_d": None} for s in CURRENT]


def test_the_caption_says_which_figure_is_drawn():
    assert "cross-fitted by group" in describe_separation(CURRENT)
    assert "predates cross-fitted" in describe_separation(OLDER)
    assert "too few groups to cross-fit" in describe_separation(UNCROSSED)
    assert "overstate" in describe_separation(OLDER)


def test_the_figure_draws_the_in_sample_figure_dashed_beside_the_cross_fitted_one():
    traces = {t.name: t for t in direction_stats_figure(CURRENT).data}
    assert set(traces) == {"norm", "AUROC", "AUROC, in-sample", "Cohen's d", "Cohen's d, in-sample"}
    assert list(traces["AUROC"].y) == [0.6] * 3 and list(traces["AUROC, in-sample"].y) == [0.9] * 3
    assert traces["Cohen's d, in-sample"].line.dash == "dash" and traces["AUROC"].line.dash is None
    older = {t.name for t in direction_stats_figure(OLDER).data}
    assert older == {"norm", "AUROC", "Cohen's d"}  # nothing dashed to draw for an older file
