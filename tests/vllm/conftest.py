"""Real vLLM servers from .venv-vllm (``make vllm``) on the converted default model with the demo
adapter as a LoRA, one per test module (they never run at once), stopped whatever happens. Skipped
without .venv-vllm, unless EMLENS_VLLM_REQUIRED=1 (CI), which makes that a failure."""

from __future__ import annotations

import os

import pytest

from core.cache import DEFAULT_ROOT
from core.models import DEMO_ADAPTER, convert_gguf, embedded_gguf
from testkit.vllm_server import VENV, VLLMServer, vllm_installed


def start(steering: bool):
    if not vllm_installed():
        if os.environ.get("EMLENS_VLLM_REQUIRED") == "1":
            pytest.fail(f"EMLENS_VLLM_REQUIRED=1 but {VENV} is missing or incomplete (`make vllm` builds it)")
        pytest.skip(f"{VENV} is absent (`make vllm` builds it)")
    model_dir, _ = convert_gguf(embedded_gguf(), DEFAULT_ROOT)
    with VLLMServer(model_dir, DEMO_ADAPTER, steering=steering) as server:
        print(f"vLLM{' with vllm-lens' if steering else ''} answered {server.startup_s:.0f} s after it was started")
        yield server


@pytest.fixture(scope="module")
def plain_server():
    yield from start(steering=False)


@pytest.fixture(scope="module")
def steering_server():
    yield from start(steering=True)
