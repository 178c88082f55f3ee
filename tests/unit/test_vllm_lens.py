"""The request fields that steer a vllm-lens server, read back the way the plugin reads them."""

from __future__ import annotations

import base64
import json

import numpy as np
import torch

from core.directions import Direction
from core.vllm_lens import STEERING_FIELD, server_root, steering_xargs


def decoded(tensor: dict) -> torch.Tensor:
    """vllm-lens's deserialize_tensor for the uncompressed form (no "compression" key)."""
    raw = base64.b64decode(tensor["data"])
    return torch.from_numpy(np.frombuffer(raw, dtype=np.dtype(tensor["dtype"])).reshape(tensor["shape"]).copy())


def test_steering_fields_carry_the_raw_direction_rows_of_the_layers_and_alpha():
    vectors = torch.randn(6, 8, generator=torch.Generator().manual_seed(1)) * 3
    direction = Direction(vectors, {"method": "test"}, [])
    xargs = steering_xargs(direction, [4, 1], -2.5)
    assert list(xargs) == [STEERING_FIELD] and isinstance(xargs[STEERING_FIELD], str)  # vllm_xargs values are strings
    (vector,) = json.loads(xargs[STEERING_FIELD])
    assert vector["layer_indices"] == [4, 1] and vector["scale"] == -2.5
    assert vector["norm_match"] is False and vector["position_indices"] is None  # raw alpha * d at every position
    assert torch.equal(decoded(vector["activations"]), torch.stack([vectors[4], vectors[1]]))


def test_server_root_drops_the_openai_suffix():
    assert server_root("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000"
    assert server_root("http://h:1/v1/") == "http://h:1"
    assert server_root("http://h:1") == "http://h:1"
