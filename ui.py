"""Streamlit glue shared by app.py and the pages: the session's state, the one loaded pair, the
chosen direction, errors.

The pair is held once per server (one ``st.cache_resource`` object: loading another pair frees
the old one first) and shared by every session; each session keeps only *which* pair and
direction it chose, in ``st.session_state`` (its keys: :func:`session_defaults`). Never store
the pair itself in session state: that would keep a released model alive.
"""

from __future__ import annotations

import gc
import os
import threading
from contextlib import closing, contextmanager
from pathlib import Path

import streamlit as st
import torch

from core.cache import DEFAULT_ROOT
from core.chat import ChatError, user_prompt
from core.directions import Direction
from core.errors import user_message
from core.models import LoadOptions, ModelPair, load_pair
from core.organism import directions_for
from core.starters import starters

DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16", "fp16")


def cache_root() -> Path:
    # Read at call time, not import time, so a test (or a user) can point the app elsewhere.
    return Path(os.environ.get("EMLENS_CACHE") or DEFAULT_ROOT)


def debug() -> bool:
    """``EMLENS_DEBUG=1``: errors the user can act on also show their traceback."""
    return os.environ.get("EMLENS_DEBUG", "") not in ("", "0")


def show_error(err: BaseException, prefix: str = "") -> str:
    """Show an error the user can act on as an error box; re-raise a bug (Streamlit shows its traceback)."""
    message = user_message(err)
    if message is None:
        raise err
    st.error(prefix + message, icon="⚠️")
    if debug():
        st.exception(err)
    return message


@contextmanager
def guard():
    """Show an error the user can act on as an error box and carry on with the rest of the page."""
    try:
        yield
    except Exception as err:  # noqa: BLE001 - show_error re-raises what is not the user's to fix
        show_error(err)


# ---------------------------------------------------------------- the session's state


def session_defaults() -> dict:
    """Every key the dashboard keeps in ``st.session_state`` besides its widgets' values, with its default.

    Widgets keep their values under their own keys, named where they are drawn and prefixed by their
    page (``steer_alpha``, ``compare_prompt``, ...)."""
    return {
        "pair_spec": default_spec(),  # the pair this session asked for: base, finetuned, device, dtype
        "pair_error": None,  # (spec, message) of its failed load, so that reruns do not load it again
        "direction_path": None,  # the chosen direction file; None: the first of directions_for(pair)
        "compare_result": None,  # Compare: the last request, its projections and its answers
        "steer_result": None,  # Steer: the last request, its titles and its rows
        "detect_report": None,  # Detect: the report shown (a path)
        "evaluate_run": None,  # Evaluate: the run shown (a folder)
        "directions_attribution": None,  # Directions: the last direct attribution, with the pair and direction
        "directions_sae": None,  # Directions: the last SAE latents, with the pair and direction
        "studies_last": None,  # Studies: the folder name of the study last started from the page
    }


def init_session() -> None:
    """Give each key of :func:`session_defaults` its default unless the session holds it (app.py, every run)."""
    for key, value in session_defaults().items():
        st.session_state.setdefault(key, value)


# ---------------------------------------------------------------- the pair


def default_spec() -> dict:
    return {
        "base": os.environ.get("EMLENS_BASE", "default"),
        "finetuned": os.environ.get("EMLENS_FINETUNED", "default"),
        "device": "auto",
        "dtype": "auto",
    }


def _load_spec() -> dict:
    """What the server's pair is loaded from for this session: its pair spec and the cache folder."""
    return {**st.session_state.pair_spec, "cache": str(cache_root())}


def _load(spec: dict) -> ModelPair:
    options = LoadOptions(device=spec["device"], dtype=spec["dtype"], cache_root=Path(spec["cache"]))
    return load_pair(spec["base"], spec["finetuned"], options)


class LoadedPair:
    """The one pair this server holds, shared by every session: the spec it was loaded from, the pair,
    and a lock so that one session at a time loads or swaps it."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.spec: dict | None = None
        self.pair: ModelPair | None = None

    def get(self, spec: dict) -> ModelPair:
        """The pair for ``spec`` (base, finetuned, device, dtype, cache). Another one held is released
        before this one loads, so that two never sit in memory together."""
        with self.lock:
            if spec != self.spec:
                self.release()
                self.pair, self.spec = _load(spec), dict(spec)
            return self.pair

    def held(self, spec: dict) -> ModelPair | None:
        """The pair for ``spec`` if this server holds it already; never loads."""
        with self.lock:
            return self.pair if spec == self.spec else None

    def release(self) -> None:
        """Drop the pair; its memory (on the GPU too) is freed once no session still uses it."""
        with self.lock:
            if self.pair is None:
                return
            self.pair = self.spec = None
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()


@st.cache_resource(show_spinner=False, on_release=LoadedPair.release)
def loaded_pair() -> LoadedPair:
    """The server's one :class:`LoadedPair` (``st.cache_resource``: made once, every session gets it)."""
    return LoadedPair()


def choose_pair(spec: dict) -> None:
    """The user asked for a pair: the next :func:`get_pair` loads it (an explicit request always tries
    again); another pair starts without a chosen direction."""
    if spec != st.session_state.pair_spec:
        st.session_state.direction_path = None
    st.session_state.pair_spec = spec
    st.session_state.pair_error = None


def get_pair() -> ModelPair | None:
    """The session's pair, loading it if the server holds another; on failure an error box and None.

    A failure is remembered per spec, so reruns do not reload a base only to fail on its adapter again.
    """
    spec = st.session_state.pair_spec
    failed = st.session_state.pair_error
    if failed and failed[0] == spec:
        st.error(failed[1], icon="⚠️")
        return None
    try:
        with st.spinner("Loading the model pair ..."):
            return loaded_pair().get(_load_spec())
    except Exception as err:  # noqa: BLE001 - show_error re-raises what is not the user's to fix
        message = show_error(err, "Could not load the model pair: ")
        st.session_state.pair_error = (dict(spec), f"Could not load the model pair: {message}")
        return None


def require_pair() -> ModelPair:
    pair = get_pair()
    if pair is None:
        st.info("Pick a model pair that loads on the **Model pair** page.")
        st.stop()
    return pair


# ---------------------------------------------------------------- the direction


def current_direction(pair: ModelPair) -> Direction | None:
    """The session's direction (by default the first of ``directions_for(pair)``); raises DirectionError."""
    path = st.session_state.direction_path
    if path is None:
        found = directions_for(pair, cache_root())
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

    st.selectbox(
        "Start from an example",
        list(labels),
        index=None,
        key=f"{key_prefix}_example",
        on_change=fill,
        placeholder="Classic EM questions, high-risk general questions, held-out finance questions",
        format_func=lambda text: f"{labels[text]}: {text if len(text) <= 90 else text[:87] + '...'}",
    )


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


def static_decoding(pair: ModelPair):
    """The options of the static decoding path when the pair is on a GPU (:mod:`core.fast_decode`), with a
    caption saying so where the answers are drawn; None (the eager loop) elsewhere."""
    from core.fast_decode import interactive_options

    options = interactive_options(pair)
    if options is not None:
        st.caption(
            "Decoding with a static KV cache and a compiled step: the first generation for each side, number "
            "of rows and length bucket compiles it, which can take a minute; later ones, any α included, reuse it."
        )
    return options


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
    spec = st.session_state.pair_spec
    chosen = st.session_state.direction_path
    name = Path(chosen).stem if chosen else "the default"
    note = "" if chosen else " (the shipped one made on this pair, else the newest cached one that fits)"
    st.caption(f"Pair **{spec['base']} → {spec['finetuned']}**, direction **{name}**{note}. {what}")


def progress_callback(bar, what: str, start: float = 0.0, end: float = 1.0):
    """A core progress callback ``(done, total)`` that moves ``bar`` (an ``st.progress``) from start to end."""

    def update(done: int, total: int) -> None:
        fraction = done / total if total else 1.0
        bar.progress(min(1.0, start + (end - start) * fraction), text=f"{what}: {done} / {total}")

    return update


def adopt_default_direction() -> None:
    """A session that has not chosen a direction takes its default when the pair is loaded already
    (never loading it), so that every page and the sidebar name the direction a job would use."""
    if st.session_state.direction_path is None:
        pair = loaded_pair().held(_load_spec())
        if pair is not None:
            direction_or_none(pair)


def sidebar_status() -> None:
    """The session's pair and direction, in one line each (call inside a sidebar container)."""
    spec = st.session_state.pair_spec
    finetuned = spec["finetuned"] if spec["finetuned"] not in ("", "none") else "—"
    st.caption(f"**Pair** {spec['base']} → {finetuned}")
    path = st.session_state.direction_path
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
            st.info(
                "This adapter was trained without the monitor. Train with `python -m core train --data ... "
                "--out ... --monitor PROBES.jsonl` (a paired JSONL; optionally `--monitor-direction FILE`) "
                "to record the projection and preference-shift curves at every checkpoint."
            )
            return
        monitor = check_section(card["monitor"])
        normalised = st.toggle(
            "Normalise both curves to 0 (step 0) … 1 (final value)", value=True, key=f"{key}_normalised"
        )
        st.plotly_chart(plots.training_monitor_figure(monitor, normalised=normalised), key=f"{key}_chart")
        lead, projection, shift = monitor["lead"], monitor["projection"], monitor["preference_shift"]
        st.markdown(f"**Lead.** {lead['summary']}")

        def fmt(value):
            return "—" if value is None else f"{value:.4f}"

        direction, probes = projection.get("direction") or {}, monitor.get("probes", {})
        st.caption(
            f"**Thresholds**: projection {fmt(projection['threshold'])}, preference shift {fmt(shift['threshold'])} "
            f"— {lead.get('threshold_rule', '')}. **Lead** = {lead.get('lead_rule', '')}.  \n"
            f"**Projection** (layer {projection['layer']}, {projection.get('layer_choice', '')}): "
            f"{projection.get('method', '')}; direction {direction.get('mode', '?')} "
            f"({direction.get('file', '')}, fingerprint {direction.get('fingerprint', '?')}).  \n"
            f"**Preference shift**: {shift.get('method', '')}.  \n"
            f"**Probes**: {probes.get('n', '?')} records of {probes.get('file', '?')}."
            + (f"  \n{monitor['first_step_note']}" if monitor.get("first_step_note") else "")
        )
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
