"""What the Steer and Compare pages call each variant, with the sign it steers with, and where Steer starts."""

import pytest
import torch

from core.directions import Direction
from core.generation import Variant
from core.steering import ALPHA_UNITS, grid_variants, ladder_variants, start_layer, variant_title


def test_grid_titles_carry_the_sign_each_side_is_steered_with():
    grid = grid_variants(["base", "finetuned"], 4.0, "add", adapter_scale=2.0)
    assert [variant_title(v, steered) for v, steered in grid] == [
        "base",
        "fine-tuned",
        "base + 4·d",
        "fine-tuned − 4·d",
        "fine-tuned, adapter × 2",
    ]
    grid = grid_variants(["base", "finetuned"], -6.0)  # a negative α reverses both
    assert [variant_title(v, steered) for v, steered in grid][2:] == ["base − 6·d", "fine-tuned + 6·d"]
    grid = grid_variants(["finetuned"], 4.0, "ablate")
    assert [variant_title(v, steered) for v, steered in grid] == ["base", "fine-tuned", "fine-tuned, d ablated"]


def test_a_steered_zero_is_named_and_norm_relative_alpha_names_its_vector():
    assert variant_title(Variant("base", 0.0)) == "base"
    assert variant_title(Variant("base", 0.0), steered=True) == "base + 0·d"
    vector = ALPHA_UNITS["norm-relative"]
    assert [variant_title(v, True, vector) for v in ladder_variants("finetuned", [-0.5, 1.25])] == [
        "fine-tuned − 0.5·‖h‖·û",
        "fine-tuned + 1.25·‖h‖·û",
    ]
    assert list(ALPHA_UNITS) == ["raw", "norm-relative"] and ALPHA_UNITS["raw"] == "d"


def _direction(cohens_d, insample=True):
    stats = [
        {"layer": i, "cohens_d": d, **({"cohens_d_insample": 1.0} if insample else {})} for i, d in enumerate(cohens_d)
    ]
    return Direction(torch.ones(len(cohens_d), 4), {}, stats)


@pytest.mark.parametrize(
    "direction, expected",
    [
        (_direction([0.1, 0.9, 0.4, 0.2, None, 0.3]), 1),  # the best cross-fitted separation
        (Direction(torch.ones(6, 4), {}, []), 3),  # no statistics: the middle layer
        (_direction([0.1, 0.9, 0.4, 0.2, 0.1, 0.3], insample=False), 3),  # in-sample only (an older file)
        (_direction([None] * 6), 3),  # too few answers to cross-fit
    ],
)
def test_steering_starts_at_the_best_separating_layer_else_the_middle(direction, expected):
    assert start_layer(direction, 6) == expected
