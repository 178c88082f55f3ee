"""The anchors of calibrated projections and the token colour scale, on directions built in memory."""

import numpy as np
import pytest
import torch

from core.calibration import anchors, colour_range, has_anchors
from core.directions import Direction

STATS = [
    {"layer": 0, "aligned_mean": -1.0, "misaligned_mean": 3.0},
    {"layer": 1, "aligned_mean": 2.0, "misaligned_mean": 0.5},
]


def test_the_anchors_are_the_zero_and_one_of_the_calibrated_scale():
    direction = Direction(torch.ones(2, 4), {}, STATS)
    assert has_anchors(direction)
    assert anchors(direction, 0) == (-1.0, 3.0) and anchors(direction, 1) == (2.0, 0.5)
    aligned = [anchors(direction, layer)[0] for layer in range(2)]
    misaligned = [anchors(direction, layer)[1] for layer in range(2)]
    assert np.allclose(direction.calibrate(np.array(aligned)), [0.0, 0.0])
    assert np.allclose(direction.calibrate(np.array(misaligned)), [1.0, 1.0])


@pytest.mark.parametrize("stats", [[], [{"layer": 0, "norm": 1.0}, {"layer": 1, "norm": 1.0}]])
def test_a_direction_without_set_means_has_no_anchors(stats):
    direction = Direction(torch.ones(2, 4), {}, stats)  # e.g. a random control, or statistics without the means
    assert not has_anchors(direction) and anchors(direction, 1) is None
    assert direction.calibrate(np.zeros(2)) is None  # and, consistently, no calibrated projections


def test_token_colours_span_the_anchors_else_the_largest_value_around_zero():
    assert colour_range([0.2, -5.0], (-1.0, 3.0)) == (-1.0, 3.0)
    assert colour_range([0.2, -5.0, 4.0], None) == (-5.0, 5.0)
    assert colour_range(np.array([0.5, 1.5]), None) == (-1.5, 1.5)
    assert colour_range([], None) == (0.0, 0.0)
