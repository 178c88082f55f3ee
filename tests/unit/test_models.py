"""Model-loading choices that need no model (loading tiny pairs is in tests/integration/test_models.py)."""

import pytest
import torch

from core.models import LoadError, resolve_dtype


def test_dtype_choice():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(LoadError, match="--dtype 'int3'"):
        resolve_dtype("int3", "cpu")
