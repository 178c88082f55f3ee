"""Streamlit glue shared by app.py and the pages: the one loaded pair, the chosen direction, errors.

The pair is loaded once per server (``st.cache_resource``, one entry: loading another pair frees
the old one) and shared by every session; each session keeps only *which* pair and direction
it chose, in ``st.session_state``. Never store the pair itself in session state: that would
keep an evicted model alive.
"""

from __future__ import annotations

import gc
import os
from contextlib import closing, contextmanager
from pathlib import Path

import streamlit as st
import torch

from core.cache import DEFAULT_ROOT, CacheError
from core.chat import ChatError, user_prompt
from core.directions import Direction, list_directions
from core.generate import Variant
from core.models import DEMO_DIRECTION, LoadError, LoadOptions, ModelPair, load_pair
from core.organism import shipped_direction_for
from core.starters import starters

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")
# What core raises for bad input (ChatError, GenerationError, LoadError, DirectionError, DataError
# are ValueErrors), an unwritable cache, and a GPU that ran out of memory.
USER_ERRORS = (ValueError, CacheError, torch.OutOfMemoryError)


def cache_root() -> Path:
    # Read at call time, not import time, so a test (or a user) can point the app elsewhere.
    return Path(os.environ.get("EMLENS_CACHE") or DEFAULT_ROOT)


@contextmanager
def guard():
    """Show bad input as an error box and carry on with the rest of the page."""
    try:
        yield
    except USER_ERRORS as err:
        st.error(f"Out of memory: {err}" if isinstance(err, torch.OutOfMemoryError) else str(err), icon="⚠️")


# ---------------------------------------------------------------- the pair

def default_spec() -> dict:
    return {"base": os.environ.get("EMLENS_BASE", "default"),
            "finetuned": os.environ.get("EMLENS_FINETUNED", "default"), "device": "auto", "dtype": "auto"}


def pair_spec() -> dict:
    if "pair_spec" not in st.session_state:
        st.session_state.pair_spec = default_spec()
    return st.session_state.pair_spec


_loaded: dict = {}  # the spec of the pair in the cache below (one per server process)


@st.cache_resource(max_entries=1, show_spinner="Loading the model pair ...")
def _load(base: str, finetuned: str, device: str, dtype: str, cache: str) -> ModelPair:
    try:
        pair = load_pair(base, finetuned, LoadOptions(device=device, dtype=dtype, cache_root=Path(cache)))
    except RuntimeError as err:  # torch's word for a device that is mistyped, absent or full
        raise LoadError(f"device {device!r}: {err}") from err
    _loaded.update(base=base, finetuned=finetuned, device=device, dtype=dtype)
    return pair


def choose_pair(spec: dict) -> None:
    """The user asked for a pair. If another one is loaded, drop it first, so that two never sit in
    memory together (max_entries=1 alone would evict the old one only after loading the new)."""
    if _loaded and spec != _loaded:
        _load.clear()
        _loaded.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    if spec != pair_spec():
        st.session_state.pop("direction_path", None)
    st.session_state.pair_spec = spec
    st.session_state.pop("pair_error", None)  # an explicit request always tries again


def get_pair() -> ModelPair | None:
    """The session's pair, loading it if no session has; on failure an error box and None.

    A failure is remembered per spec, so reruns do not reload a base only to fail on its adapter again.
    """
    spec = pair_spec()
    failed = st.session_state.get("pair_error")
    if failed and failed[0] == spec:
        st.error(failed[1], icon="⚠️")
        return None
    try:
        return _load(spec["base"], spec["finetuned"], spec["device"], spec["dtype"], str(cache_root()))
    except USER_ERRORS as err:
        st.session_state.pair_error = (dict(spec), f"Could not load the model pair: {err}")
        st.error(st.session_state.pair_error[1], icon="⚠️")
        return None


def require_pair() -> ModelPair:
    pair = get_pair()
    if pair is None:
        st.info("Pick a model pair that loads on the **Model pair** page.")
        st.stop()
    return pair


# ---------------------------------------------------------------- the direction

def direction_choices(pair: ModelPair) -> list[tuple[Path, Direction]]:
    """Directions the session may choose by default: the shipped one when it was made on exactly
    this pair, then the cached ones that fit the pair's shape, newest first."""
    shipped, _ = shipped_direction_for(pair)
    cached = list_directions(cache_root(), pair.n_layers, pair.d_model)
    return ([(DEMO_DIRECTION, shipped)] if shipped is not None else []) + cached


def current_direction(pair: ModelPair) -> Direction | None:
    """The session's direction (by default the first of ``direction_choices``); raises DirectionError."""
    path = st.session_state.get("direction_path")
    if path is None:
        found = direction_choices(pair)
        if not found:
            return None
        path = st.session_state.direction_path = str(found[0][0])
    direction = Direction.load(path)
    direction.check_fits(pair.n_layers, pair.d_model, "the loaded pair")
    return direction


def direction_or_none(pair: ModelPair) -> Direction | None:
    with guard():
        return current_direction(pair)
    return None


def require_direction(pair: ModelPair) -> Direction:
    direction = direction_or_none(pair)
    if direction is None:
        st.info("Choose or build a direction on the **Model pair** page.")
        st.stop()
    return direction


def direction_label(path: Path | str, direction: Direction) -> str:
    p = direction.provenance
    return f"{Path(path).stem} · {p.get('method', '?')} · {str(p.get('created', ''))[:16]}"


def provenance_row(path: Path | str, direction: Direction) -> dict:
    p = direction.provenance
    return {
        "file": Path(path).name,
        "method": p.get("method"),
        "model": f"{p.get('base')} → {p.get('finetuned')}" if p.get("finetuned") else p.get("base"),
        "dataset": Path(p["dataset"]).name if p.get("dataset") else p.get("dataset_sha256"),
        "split": p.get("split"),
        "aligned": p.get("n_aligned"),
        "misaligned": p.get("n_misaligned"),
        "created": p.get("created"),
    }


# ---------------------------------------------------------------- prompts and answers

def prompt_messages(prompt: str, system: str = "") -> list[dict]:
    if not prompt.strip():
        raise ChatError("The prompt is empty: type a question first.")
    return user_prompt(prompt, system.strip() or None)


def example_picker(key_prefix: str) -> None:
    """A selectbox "Start from an example" (key ``{key_prefix}_example``) whose choice replaces the text
    of the prompt area ``{key_prefix}_prompt``. Widgets inside an ``st.form`` cannot have callbacks:
    draw this one outside (above) the form and the area inside it with ``prompt_area``."""
    labels = {text: label for label, text in starters()}  # the options are the prompt texts themselves

    def fill() -> None:
        chosen = st.session_state.get(f"{key_prefix}_example")
        if chosen is not None:
            st.session_state[f"{key_prefix}_prompt"] = chosen

    st.selectbox("Start from an example", list(labels), index=None, key=f"{key_prefix}_example", on_change=fill,
                 placeholder="Classic EM questions, high-risk general questions, held-out finance questions",
                 format_func=lambda text: f"{labels[text]}: {text if len(text) <= 90 else text[:87] + '...'}")


def prompt_area(key_prefix: str, default: str, label: str = "Prompt", **text_area_args) -> str:
    """A text area (key ``{key_prefix}_prompt``) that starts out holding ``default`` as real text (not a
    placeholder), so the page runs without typing; returns its text. Works inside an ``st.form``."""
    key = f"{key_prefix}_prompt"
    if key not in st.session_state:
        # Set through session state, not value=: the example picker writes the same key.
        st.session_state[key] = default
    return st.text_area(label, key=key, **text_area_args)


def prompt_input(key_prefix: str, default: str, label: str = "Prompt", **text_area_args) -> str:
    """``example_picker`` then ``prompt_area``, one below the other; returns the prompt text.

    ``prompt_input("steer", DEFAULT_STEER_PROMPT)`` draws the selectbox ``steer_example`` and the text
    area ``steer_prompt`` (holding the default until the user edits it or picks an example); extra
    keyword arguments go to ``st.text_area`` (e.g. ``height``, ``help``). Not for use inside an
    ``st.form``: there call ``example_picker`` above the form and ``prompt_area`` inside it.
    """
    example_picker(key_prefix)
    return prompt_area(key_prefix, default, label, **text_area_args)


def variant_title(variant: Variant, steered: bool = False, vector: str = "d") -> str:
    """``base``, ``fine-tuned − 4·d``, ``base, d ablated``, ``fine-tuned, adapter × 2``; ``steered`` names a
    zero coefficient too; ``vector`` names what α multiplies."""
    side = "fine-tuned" if variant.side == "finetuned" else "base"
    if variant.adapter_scale is not None:
        side = f"{side}, adapter × {variant.adapter_scale:g}"
    if variant.ablate:
        return f"{side}, d ablated"
    if variant.alpha == 0:
        return f"{side} + 0·{vector}" if steered else side
    return f"{side} {'+' if variant.alpha > 0 else '−'} {abs(variant.alpha):g}·{vector}"


def stream_rows(pair: ModelPair, generator, placeholders: list) -> list:
    """Show each row's text as it grows; return the final rows.

    ``closing`` ends the generator (and releases the pair's lock) in this thread even when the user
    interrupts the run by changing a widget.
    """
    rows = []
    with closing(generator):
        for rows in generator:
            for row, placeholder in zip(rows, placeholders):
                placeholder.text(pair.tokenizer.decode(row.token_ids, skip_special_tokens=True) or "…")
    return rows


def token_pieces(pair: ModelPair, token_ids: list[int]) -> list[str]:
    return [pair.tokenizer.decode([t], skip_special_tokens=True) for t in token_ids]


def job_caption(what: str) -> None:
    """Say which pair and direction a job on this page will run on, then what it does."""
    spec = pair_spec()
    chosen = st.session_state.get("direction_path")
    st.caption(f"Pair **{spec['base']} → {spec['finetuned']}**, direction "
               f"**{Path(chosen).stem if chosen else 'the newest cached one that fits'}**. {what}")


def progress_callback(bar, what: str, start: float = 0.0, end: float = 1.0):
    """A core progress callback ``(done, total)`` that moves ``bar`` (an ``st.progress``) from start to end."""
    def update(done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        bar.progress(min(1.0, start + (end - start) * fraction), text=f"{what}: {done} / {total}")
    return update


def sidebar_status() -> None:
    """The session's pair and direction, in one line each (call inside a sidebar container)."""
    spec = pair_spec()
    finetuned = spec["finetuned"] if spec["finetuned"] not in ("", "none") else "—"
    st.caption(f"**Pair** {spec['base']} → {finetuned}")
    path = st.session_state.get("direction_path")
    st.caption(f"**Direction** {Path(path).stem if path else '—'}")


# ---------------------------------------------------------------- training view (a training card's monitor curves)

def training_view(run_card, key: str = "training_view") -> None:
    """Show a training card's monitor curves: the prompt-stage projection and the preference shift against the
    training step, their thresholds, the lead in words, and how each was made.

    ``run_card``: the card (a dict, e.g. ``TrainResult.card``), an adapter directory, or a
    ``training_card.json`` path. A card without monitor curves gets a note on how to make them."""
    import pandas as pd

    from core import plots
    from core.monitor import check_section, load_training_card

    with guard():
        card = run_card if isinstance(run_card, dict) else load_training_card(run_card)
        if "monitor" not in card:
            st.info("This adapter was trained without the monitor. Train with `python -m core train --data ... "
                    "--out ... --monitor PROBES.jsonl` (a paired JSONL; optionally `--monitor-direction FILE`) "
                    "to record the projection and preference-shift curves at every checkpoint.")
            return
        monitor = check_section(card["monitor"])
        normalised = st.toggle("Normalise both curves to 0 (step 0) … 1 (final value)", value=True,
                               key=f"{key}_normalised")
        st.plotly_chart(plots.training_monitor_figure(monitor, normalised=normalised), key=f"{key}_chart")
        lead, projection, shift = monitor["lead"], monitor["projection"], monitor["preference_shift"]
        st.markdown(f"**Lead.** {lead['summary']}")

        def fmt(value):
            return "—" if value is None else f"{value:.4f}"
        direction = projection.get("direction") or {}
        st.caption(
            f"**Thresholds**: projection {fmt(projection['threshold'])}, preference shift {fmt(shift['threshold'])} "
            f"— {lead.get('threshold_rule', '')}. **Lead** = {lead.get('lead_rule', '')}.  \n"
            f"**Projection** (layer {projection['layer']}, {projection.get('layer_choice', '')}): "
            f"{projection.get('method', '')}; direction {direction.get('mode', '?')} "
            f"({direction.get('file', '')}, fingerprint {direction.get('fingerprint', '?')}).  \n"
            f"**Preference shift**: {shift.get('method', '')}.  \n"
            f"**Probes**: {monitor.get('probes', {}).get('n', '?')} records of {monitor.get('probes', {}).get('file', '?')}."
            + (f"  \n{monitor['first_step_note']}" if monitor.get("first_step_note") else ""))
        rows = {"step": monitor["steps"], "projection": projection["values"]}
        if projection.get("calibrated"):
            rows["projection (calibrated)"] = projection["calibrated"]
        rows["preference shift"] = shift["values"]
        if shift.get("sem"):
            rows["shift s.e.m."] = shift["sem"]
        st.dataframe(pd.DataFrame(rows), hide_index=True, key=f"{key}_table")


def training_view_picker(key: str = "training_view", roots: list[Path] | None = None) -> None:
    """A selectbox over the adapters with a training card (the shipped ones in assets/, those under
    ./adapters and the cache; those with monitor curves first) or a typed adapter directory, then
    :func:`training_view` of the chosen one."""
    from core.models import ASSETS
    from core.monitor import find_training_cards

    roots = roots if roots is not None else [ASSETS, Path("adapters"), cache_root()]
    found = find_training_cards(roots)
    chosen = st.selectbox("Adapter", found, format_func=str, key=f"{key}_adapter") if found else None
    typed = st.text_input("…or an adapter directory", key=f"{key}_path", placeholder="adapters/mine").strip()
    if typed:
        chosen = Path(typed).expanduser()
    if chosen is None:
        st.info("No adapter with a training card found; type an adapter directory.")
        return
    training_view(chosen, key)
