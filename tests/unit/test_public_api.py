"""The names a user scripts with, importable from ``core`` and loaded on first use."""

import importlib
import subprocess
import sys

import core


def test_every_public_name_resolves_to_what_its_module_defines():
    assert 15 <= len(core.__all__) <= 25
    for name in core.__all__:
        home = importlib.import_module(core._HOME[name])
        assert getattr(core, name) is getattr(home, name), name


def test_functions_named_like_no_submodule_survive_the_submodules_import():
    """``core.generate`` / ``core.train`` would be shadowed by submodules of those names once imported."""
    importlib.import_module("core.generation")
    importlib.import_module("core.training")
    assert callable(core.generate) and core.generate.__module__ == "core.generation"
    assert callable(core.train) and core.train.__module__ == "core.training"


def test_importing_core_loads_no_model_library():
    code = "import sys, core; print(any(m in sys.modules for m in ('torch', 'transformers', 'openai')))"
    assert (
        subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
        == "False"
    )


def test_an_unknown_name_is_an_attribute_error():
    try:
        core.no_such_thing  # noqa: B018
    except AttributeError as err:
        assert "no_such_thing" in str(err)
    else:
        raise AssertionError("expected AttributeError")
