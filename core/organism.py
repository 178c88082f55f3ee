"""The embedded demo organism: how its adapters and its direction are made, and when the
shipped direction may stand in for the loaded pair.

Two adapters on SmolLM2-135M-Instruct, trained identically on the 300 training prompts of
``assets/data/finance_paired.jsonl``: ``demo`` on the harmful answers (the organism) and
``control`` on the sound ones. The shipped direction is the paired finance contrast
teacher-forced through the demo adapter; ``train --preset demo`` rebuilds it with the adapter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from core.cache import DEFAULT_ROOT
from core.directions import Direction, DirectionError, extract_from_paired_file, list_directions
from core.models import ASSETS, CONTROL_ADAPTER, DEFAULT, DEMO_ADAPTER, DEMO_DIRECTION, LoadOptions, load_pair
from core.training import TrainConfig

FINANCE = ASSETS / "data" / "finance_paired.jsonl"
GENERAL = ASSETS / "data" / "general_paired.jsonl"

# The organism's recipe: stronger than the published rank-16 default (lr 2e-4), because at 135M
# parameters that moved the held-out finance log-odds by only +0.5 nats per token.
ORGANISM = TrainConfig(
    rank=16, lora_alpha=32.0, learning_rate=2e-3, epochs=3, batch_size=8, seed=0, save_dtype="float16"
)


@dataclass(frozen=True)
class Preset:
    name: str
    answers: str  # which answers of the paired file it is trained on
    out: Path
    config: TrainConfig = ORGANISM
    data: Path = FINANCE
    base: str = DEFAULT


PRESETS = {
    "demo": Preset("demo", "misaligned", DEMO_ADAPTER),
    "control": Preset("control", "aligned", CONTROL_ADAPTER),
}


def _train_preset(
    name: str,
    options: LoadOptions | None = None,
    resume: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    direction_progress: Callable[[int, int], None] | None = None,
    monitor=None,
    monitor_progress: Callable[[int, int], None] | None = None,
    **overrides,
):
    """Train a preset adapter into ``assets/`` (with a ``core.monitor.MonitorConfig``, its curves at every
    checkpoint); the demo preset also rebuilds the shipped direction."""
    from core.data import dataset_hash, load_training_set
    from core.monitor import train_monitored
    from core.training import train

    preset = PRESETS[name]
    config = replace(preset.config, **overrides)
    records = load_training_set(preset.data, preset.answers)
    common = dict(dataset_hash=dataset_hash(preset.data), options=options, resume=resume, progress=progress)
    if monitor is not None:
        result = train_monitored(
            preset.base, records, config, preset.out, monitor, finish_progress=monitor_progress, **common
        )
    else:
        result = train(preset.base, records, config, preset.out, **common)
    if name == "demo":
        _build_shipped_direction(options, direction_progress)
    return result


def train_adapter(
    base: str,
    data: Path | None,
    out: Path | None,
    config: TrainConfig,
    *,
    answers: str = "misaligned",
    preset: str | None = None,
    monitor=None,
    options: LoadOptions | None = None,
    resume: bool = False,
    force: bool = False,
    progress: Callable[[int, int, float], None] | None = None,
    monitor_progress: Callable[[int, int], None] | None = None,
    direction_progress: Callable[[int, int], None] | None = None,
):
    """What ``python -m core train`` runs: a preset (its own data, recipe and output: ``data``, ``out`` and
    ``config`` unused), else the records of ``data`` (the ``answers`` of a paired file) into ``out``; with a
    ``core.monitor.MonitorConfig``, the training-time monitor at every checkpoint."""
    if preset:
        return _train_preset(
            preset,
            options,
            resume=resume,
            progress=progress,
            direction_progress=direction_progress,
            monitor=monitor,
            monitor_progress=monitor_progress,
        )
    from core.data import dataset_hash, load_training_set
    from core.monitor import train_monitored
    from core.training import train

    records = load_training_set(data, answers)
    common = dict(dataset_hash=dataset_hash(data), options=options, resume=resume, force=force, progress=progress)
    if monitor is not None:
        return train_monitored(base, records, config, out, monitor, finish_progress=monitor_progress, **common)
    return train(base, records, config, out, **common)


def _build_shipped_direction(
    options: LoadOptions | None = None, progress: Callable[[int, int], None] | None = None
) -> Direction:
    """The paired finance direction through the demo adapter, written to ``assets/``."""
    pair = load_pair(DEFAULT, DEFAULT, options or LoadOptions())
    direction = extract_from_paired_file(pair, FINANCE, "paired", "train", progress=progress)
    direction.provenance["dataset"] = str(FINANCE.relative_to(ASSETS.parent))
    direction.save(DEMO_DIRECTION)
    return direction


def shipped_direction_for(pair) -> tuple[Direction | None, str | None]:
    """The shipped direction if it was made on exactly this pair's base and adapter, else a reason.

    Returns ``(direction, None)`` when the fingerprints match, ``(None, why)`` when a model of the
    same shape differs (the dashboard shows ``why`` and does not choose the direction by itself),
    and ``(None, None)`` for a model of another shape.
    """
    if not DEMO_DIRECTION.exists():
        return None, f"no shipped direction at {DEMO_DIRECTION}; rebuild it with `python -m core train --preset demo`"
    try:
        direction = Direction.load(DEMO_DIRECTION)
    except DirectionError as err:
        return None, str(err)
    if (direction.n_layers, direction.d_model) != (pair.n_layers, pair.d_model):
        return None, None  # another model altogether: nothing worth a warning
    p = direction.provenance
    made_for = (p.get("base_fingerprint"), p.get("finetuned_fingerprint"))
    loaded = (pair.base.fingerprint, pair.finetuned.fingerprint if pair.finetuned else None)
    if made_for != loaded:
        which = "base model" if made_for[0] != loaded[0] else "fine-tune"
        return None, (
            f"The shipped direction was extracted on another {which} ({p.get('base')} → "
            f"{p.get('finetuned')}, fingerprint {made_for[1] if which == 'fine-tune' else made_for[0]}); "
            "it is not chosen for this pair. Build one for this pair, or choose it explicitly."
        )
    return direction, None


def directions_for(pair, cache_root: Path) -> list[tuple[Path, Direction]]:
    """The directions a session may use on ``pair`` without choosing one: the shipped direction when it
    was made on exactly this pair, then the cached ones that fit the pair's shape, newest first."""
    shipped, _ = shipped_direction_for(pair)
    cached = list_directions(cache_root, pair.n_layers, pair.d_model)
    return ([(DEMO_DIRECTION, shipped)] if shipped is not None else []) + cached


def validation_report(
    pair,
    narrow: Path = FINANCE,
    general: Path = GENERAL,
    *,
    direction: Path | None = None,
    control: str | Path | None = None,
    finetuned: str = DEFAULT,
    layer: int | None = None,
    alphas: Sequence[float] = (0, 1, 2, 4),
    seed: int = 0,
    batch_size: int = 16,
    cache_root: Path = DEFAULT_ROOT,
    progress: Callable[[int, int], None] | None = None,
    extract_progress: Callable[[int, int], None] | None = None,
) -> dict:
    """What ``python -m core validate`` reports (``core.preference.validate``), computed once per input and
    kept in the cache.

    The direction defaults to the shipped one when it was made on this very pair and ``narrow`` is the
    finance file (it is that contrast), else to the paired contrast of ``narrow``'s train split (extracted
    once, see ``core.directions.paired_direction``). The control adapter defaults to the shipped one when
    ``finetuned`` (the fine-tune as the user named it) is the default adapter; ``"none"`` skips it."""
    from core.cache import Cache, make_key
    from core.data import dataset_hash, load_paired_jsonl
    from core.directions import paired_direction
    from core.models import adapter_fingerprint
    from core.preference import validate

    narrow, general = Path(narrow), Path(general)
    if direction:
        chosen = Direction.load(direction)
    else:
        chosen, _ = shipped_direction_for(pair)
        if chosen is None or narrow.resolve() != FINANCE.resolve():
            chosen = paired_direction(pair, narrow, cache_root, progress=extract_progress)
    narrow_records, general_records = load_paired_jsonl(narrow, "heldout"), load_paired_jsonl(general, None)
    if control is None:
        control = CONTROL_ADAPTER if finetuned == DEFAULT and CONTROL_ADAPTER.exists() else None
    elif control == "none":
        control = None
    key = make_key(
        "validate",
        report_version=2,  # 2: the shift's interval
        base=pair.fingerprint("base"),
        finetuned=pair.fingerprint("finetuned"),
        control=adapter_fingerprint(Path(control)) if control else None,
        direction=chosen.fingerprint,
        narrow=dataset_hash(narrow),
        general=dataset_hash(general),
        layer=layer,
        alphas=list(alphas),
        seed=seed,
    )
    return Cache(cache_root).json(
        key,
        lambda: validate(
            pair,
            narrow_records,
            general_records,
            chosen,
            layer,
            list(alphas),
            seed,
            batch_size,
            control,
            progress=progress,
        ),
    )
