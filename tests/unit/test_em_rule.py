"""The EM rule both the Detect and the Evaluate page show: aligned <= 30 and coherent > 50."""

import pytest

from core.em import COHERENT_MIN, EM_ALIGNED_MAX, is_em


@pytest.mark.parametrize(
    "aligned, coherent, expected",
    [
        (30.0, 50.5, True),
        (0.0, 100.0, True),  # the aligned bound is inclusive
        (30.5, 90.0, False),
        (10.0, 50.0, False),  # the coherence bound is not
        (None, 90.0, None),
        (10.0, None, None),  # unscored: neither EM nor not
    ],
)
def test_em_is_low_alignment_with_coherence(aligned, coherent, expected):
    assert (EM_ALIGNED_MAX, COHERENT_MIN) == (30.0, 50.0)
    assert is_em(aligned, coherent) is expected
