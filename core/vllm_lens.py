"""Steering on a vLLM server through the ``vllm-lens`` plugin: the request fields that carry a
direction, its layers and alpha, and the check that a server runs the plugin.

vllm-lens reads per-request steering vectors from ``vllm_xargs["apply_steering_vectors"]``: a
JSON-encoded list of its ``SteeringVector`` objects, each with ``activations`` (one row per layer,
``[n_layers, d_model]``, a base64 tensor), ``layer_indices``, ``scale``, ``norm_match`` and
``position_indices``. Its forward hook on ``model.layers[i]`` (vLLM's decoder blocks, numbered
from 0) adds ``scale * activations[k]`` to the output of block ``layer_indices[k]`` at every
position of the prefill and of every decoding step. That is this project's layer numbering (layer
i = the output of block i) and core.hooks.steer's operation with the raw direction, so alpha means
the same on both engines: ``norm_match`` stays off (it would rescale the vector to the residual's
norm) and ``position_indices`` None (every position). Ablation has no such field: vllm-lens runs
arbitrary code only as pickled Python functions, which do not cross Python versions.

The plugin adds its ``/v1/hooks/*`` routes to the server's API; a server whose OpenAPI schema has
none of them would ignore the steering fields and sample unsteered answers, so it is refused
before any request.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence

import httpx
import torch

from core.directions import Direction
from core.errors import EMLensError

STEERING_FIELD = "apply_steering_vectors"
HOOK_ROUTES = "/v1/hooks/"


class SteeringServerError(EMLensError):
    """A server asked to steer that cannot: it does not run vllm-lens, or cannot be asked."""


def _encoded_tensor(tensor: torch.Tensor) -> dict:
    """vllm-lens's uncompressed tensor form: float32 bytes in base64, with dtype and shape."""
    array = tensor.detach().to(torch.float32).cpu().contiguous().numpy()
    return {"data": base64.b64encode(array.tobytes()).decode("ascii"), "dtype": "float32", "shape": list(array.shape)}


def steering_xargs(direction: Direction, layers: Sequence[int], alpha: float) -> dict[str, str]:
    """The ``vllm_xargs`` of a request steered by ``alpha * direction[L]`` at each of ``layers``."""
    vector = {
        "activations": _encoded_tensor(torch.stack([direction.vectors[layer] for layer in layers])),
        "layer_indices": [int(layer) for layer in layers],
        "scale": float(alpha),
        "norm_match": False,
        "position_indices": None,
    }
    return {STEERING_FIELD: json.dumps([vector])}


def server_root(url: str) -> str:
    """The server's root from its OpenAI base URL (``http://host:port/v1`` -> ``http://host:port``)."""
    url = url.rstrip("/")
    return url[: -len("/v1")] if url.endswith("/v1") else url


def check_steering_server(url: str, api_key: str, timeout_s: float = 30.0) -> None:
    """Raise SteeringServerError unless the server at ``url`` runs vllm-lens (its API lists the
    plugin's /v1/hooks routes). Sends no generation request."""
    schema_url = server_root(url) + "/openapi.json"
    try:
        response = httpx.get(schema_url, headers={"Authorization": f"Bearer {api_key}"}, timeout=timeout_s)
    except httpx.HTTPError as err:
        raise SteeringServerError(f"cannot ask {schema_url} whether the server can steer: {err}") from None
    if response.status_code != 200:
        raise SteeringServerError(
            f"cannot tell whether the server at {url} can steer: {schema_url} answered HTTP "
            f"{response.status_code} (a vLLM server started with --disable-fastapi-docs hides it)"
        )
    try:
        paths = response.json().get("paths") or {}
    except (ValueError, AttributeError):
        raise SteeringServerError(
            f"cannot tell whether the server at {url} can steer: {schema_url} is not JSON"
        ) from None
    if not any(str(path).startswith(HOOK_ROUTES) for path in paths):
        raise SteeringServerError(
            f"the server at {url} cannot steer: it does not run the vllm-lens plugin (its API has no "
            f"{HOOK_ROUTES} routes), so steered and random-control cells would come back unsteered. "
            "Serve the model with vllm-lens installed (a GPU machine, Python >= 3.12; see the README), "
            "or sample these cells with --engine hf"
        )
