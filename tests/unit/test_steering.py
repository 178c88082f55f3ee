"""What a steering request asks for, without a model: the grid and the alpha lists (steering on tiny
random models is in tests/integration/test_steering.py)."""

import pytest

from core.generation import GenerationError
from core.parsing import ParseError
from core.steering import grid_variants, parse_alphas


def test_grid_variants_and_bad_alpha_lists():
    grid = grid_variants(["base", "finetuned"], 4.0, "add", adapter_scale=2.0)
    assert [(v.label, steered) for v, steered in grid] == [
        ("base", False),
        ("finetuned", False),
        ("base+4", True),
        ("finetuned-4", True),
        ("finetuned*2", False),
    ]
    assert [v.label for v, _ in grid_variants(["finetuned"], 4.0, "ablate")] == [
        "base",
        "finetuned",
        "finetuned:ablate",
    ]
    with pytest.raises(GenerationError, match="mode 'scale'"):
        grid_variants(["base"], 1.0, "scale")
    with pytest.raises(ParseError, match="^α list '1, x': 'x' is not a number"):
        parse_alphas("1, x")
    with pytest.raises(GenerationError, match="not a finite number"):
        parse_alphas("1, inf")
    assert parse_alphas("4, 4, -2") == [4.0, -2.0]
