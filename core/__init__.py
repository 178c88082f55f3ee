"""EM Lens core library: model pairs, residual-stream hooks, directions, detection.

Never imports streamlit; the dashboard pages and the CLI are thin layers over this package.
The names a script needs are importable from here (``from core import load_pair, steer``);
each is loaded on first use, so ``import core`` stays cheap.
"""

from importlib import import_module

__version__ = "0.1.0"

_HOME = {
    # the pair
    "load_pair": "core.models",
    "LoadOptions": "core.models",
    "ModelPair": "core.models",
    # directions
    "Direction": "core.directions",
    "extract_contrast": "core.directions",
    "extract_model_diff": "core.directions",
    "extract_from_paired_file": "core.directions",
    # the residual stream
    "capture": "core.hooks",
    "steer": "core.hooks",
    "ablate": "core.hooks",
    # generation
    "Variant": "core.generation",
    "Sampling": "core.generation",
    "generate": "core.generation",
    "stream": "core.generation",
    # reading prompts and answers
    "prompt_projections": "core.projections",
    "log_odds": "core.preference",
    "detection_report": "core.detect",
    "judge_answers": "core.judge",
    "JudgeConfig": "core.judge",
    # training
    "train": "core.training",
    "TrainConfig": "core.training",
    # errors
    "EMLensError": "core.errors",
}

__all__ = sorted(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(import_module(_HOME[name]), name)
    raise AttributeError(f"module 'core' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
