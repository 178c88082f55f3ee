"""Model-loading choices that need no model (loading tiny pairs is in tests/integration/test_models.py)."""

import pytest
import torch

from core.models import LoadError, resolve_device, resolve_dtype


def test_dtype_choice():
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16
    with pytest.raises(LoadError, match="--dtype 'int3'"):
        resolve_dtype("int3", "cpu")


def test_device_choice():
    assert resolve_device("cpu") == "cpu"
    with pytest.raises(LoadError, match=r"^--device 'cdua': expected auto, cpu, cuda, cuda:N or mps$"):
        resolve_device("cdua")
    if not torch.cuda.is_available():
        with pytest.raises(LoadError, match="^--device cuda:0: CUDA is not available on this machine$"):
            resolve_device("cuda:0")
