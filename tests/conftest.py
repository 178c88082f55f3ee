"""Shared fixtures: tiny random pairs written to disk and loaded through the real loaders, and
the real SmolLM2-135M-Instruct pair for behaviour tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from testkit.tiny import write_tiny_adapter, write_tiny_model

torch.set_num_threads(min(2, os.cpu_count() or 1))

TIERS = ("unit", "integration", "app", "behaviour", "browser", "vllm")  # the markers declared in pyproject.toml


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects by marker
def pytest_collection_modifyitems(items):
    """Each test carries its tier's marker, the name of the folder under tests/ it lives in."""
    here = Path(__file__).parent
    for item in items:
        tier = item.path.relative_to(here).parts[0]
        if tier in TIERS:
            item.add_marker(tier)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models run fastest on one thread, and many times faster when other work shares the CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{name: directory} of tiny Qwen2 (ChatML) and Llama (Llama-3) models with random adapters."""
    root = tmp_path_factory.mktemp("tiny")
    dirs = {
        "qwen2": write_tiny_model(root / "qwen2", "qwen2", "chatml", seed=0),
        "llama": write_tiny_model(root / "llama", "llama", "llama3", seed=1),
    }
    dirs["qwen2_adapter"] = write_tiny_adapter(dirs["qwen2"], root / "qwen2_adapter", seed=2)
    dirs["llama_adapter"] = write_tiny_adapter(dirs["llama"], root / "llama_adapter", seed=3)
    return dirs


@pytest.fixture(scope="session")
def tiny_pair(tiny_dirs):
    from core.models import load_pair

    return load_pair(str(tiny_dirs["qwen2"]), str(tiny_dirs["qwen2_adapter"]))


@pytest.fixture(scope="session")
def llama_pair(tiny_dirs):
    from core.models import load_pair

    return load_pair(str(tiny_dirs["llama"]), str(tiny_dirs["llama_adapter"]))


@pytest.fixture(scope="session")
def smol_pair():
    """The embedded default pair (real weights); converted once by the setup, reused here."""
    from core.models import load_pair

    return load_pair("default", "default")


@pytest.fixture(scope="session")
def smol_base():
    from core.models import load_pair

    return load_pair("default", "none")
