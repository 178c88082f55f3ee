"""Steer, live: every change of α, layers, mode or adapter scale regenerates the grid (or the dose
ladder) by itself, streaming; a newer change stops the generation it supersedes."""

import time

import streamlit as st

import ui
from core import plots
from core.cache import Cache
from core.calibration import has_anchors
from core.generation import Sampling, stream
from core.starters import DEFAULT_STEER_PROMPT
from core.steering import (
    ALPHA_UNITS,
    grid_variants,
    ladder_variants,
    norm_relative,
    parse_alphas,
    residual_norms,
    start_layer,
    variant_title,
)

ui.init_session()  # a page opened by its own URL runs without app.py

DEBOUNCE_S = 0.3  # a widget change inside this pause reruns the page before any work starts

st.title("Steer")
pair = ui.require_pair()
direction = ui.require_direction(pair)
st.caption(
    "Base, fine-tune and the steered variants regenerate as you move the controls. Raw α = 1 moves the "
    "residual stream by one full mean difference between misaligned and aligned answers; norm-relative "
    "α = 1 moves it by the layer's mean residual norm. The same seed with another α shows the effect of α "
    "alone: every row keeps its random stream."
)

prompt = ui.prompt_input("steer", DEFAULT_STEER_PROMPT, height=68)
system = st.text_input("System prompt (optional)", key="steer_system", help="empty: the chat template's own default")
view = st.segmented_control("View", ["Grid", "Dose ladder"], default="Grid", required=True, key="steer_view")

left, middle, right = st.columns(3)
units = left.radio(
    "α units",
    list(ALPHA_UNITS),
    horizontal=True,
    key="steer_units",
    help="raw: multiples of the direction's mean difference d[L]; norm-relative: fractions of the "
    "mean residual norm at layer L (measured on the base), along the unit direction",
)
start = start_layer(direction, pair.n_layers)
layers = middle.select_slider(
    "Layers",
    list(range(pair.n_layers)),
    (start, start),
    key="steer_layers",
    help="one layer, or a contiguous range (drag the two ends apart); it starts at the "
    "layer where the direction best separates its own held-out answers",
)
if view == "Grid":
    if units == "raw":
        alpha = left.slider(
            "α",
            -16.0,
            16.0,
            4.0,
            0.5,
            key="steer_alpha",
            help="added to the base (base + α·d) and subtracted from the fine-tune "
            "(fine-tuned − α·d); a negative α reverses both",
        )
    else:
        alpha = left.slider("α (fraction of the residual norm)", -2.0, 2.0, 0.5, 0.05, key="steer_alpha_relative")
    mode = right.radio(
        "Mode",
        ["add", "ablate"],
        horizontal=True,
        key="steer_mode",
        help="add: ± α·d at every position; ablate: remove the component along d (α unused)",
    )
    sides = middle.multiselect(
        "Steer",
        list(pair.sides),
        default=list(pair.sides),
        key="steer_sides",
        format_func=lambda s: "fine-tuned" if s == "finetuned" else s,
    )
    adapter_scale = (
        right.slider(
            "Adapter scale",
            0.0,
            4.0,
            2.0,
            0.25,
            key="steer_adapter_scale",
            help="direction-free steering: the fine-tune's LoRA update times this "
            "(0 = base, 1 = fine-tune, above 1 amplifies it)",
        )
        if pair.is_adapter
        else None
    )
else:
    side = right.radio(
        "Side",
        list(pair.sides),
        horizontal=True,
        key="steer_ladder_side",
        format_func=lambda s: "fine-tuned" if s == "finetuned" else s,
    )
    alphas_text = left.text_input(
        "α values", "-8, -4, 0, 4, 8" if units == "raw" else "-1, -0.5, 0, 0.5, 1", key=f"steer_ladder_alphas_{units}"
    )
with st.expander("Sampling"):
    left, middle, right, last = st.columns(4)
    seed = left.number_input("Seed", 0, 2**31 - 1, 0, key="steer_seed")
    max_new_tokens = middle.number_input("Max new tokens", 1, 4096, 48, key="steer_max_new_tokens")
    temperature = right.number_input("Temperature", 0.0, 5.0, 0.7, 0.1, key="steer_temperature", help="0 = greedy")
    top_p = last.number_input("Top-p", 0.01, 1.0, 1.0, 0.05, key="steer_top_p")

with ui.guard():
    messages = ui.prompt_messages(prompt, system)
    sampling = Sampling(float(temperature), float(top_p), int(max_new_tokens), int(seed))
    vector = ALPHA_UNITS[units]
    if view == "Grid":
        grid = grid_variants(sides, alpha, mode, adapter_scale)
        variants = [v for v, _ in grid]
        titles = [variant_title(v, steered, vector) for v, steered in grid]
    else:
        variants = ladder_variants(side, parse_alphas(alphas_text))
        titles = [variant_title(v, True, vector) for v in variants]
    steering = direction
    if units == "norm-relative":
        steering = norm_relative(direction, residual_norms(pair, "base", cache=Cache(ui.cache_root())))
    request = {
        "view": view,
        "messages": messages,
        "sampling": sampling,
        "variants": variants,
        "units": units,
        "layers": list(range(layers[0], layers[1] + 1)),
        "direction": direction.fingerprint,
    }
    state = st.session_state.steer_result
    if state is None or state["request"] != request:
        time.sleep(DEBOUNCE_S)
        state = st.session_state.steer_result = {"request": request, "titles": titles, "rows": None}
        live = st.empty()  # the streaming grid, replaced below by the finished one with its captions and chart
        columns = live.container().columns(len(variants))
        placeholders = [column.container(border=True) for column in columns]
        for title, placeholder in zip(titles, placeholders):
            placeholder.markdown(f"**{title}**")
        slots = [placeholder.empty() for placeholder in placeholders]
        state["rows"] = ui.stream_rows(
            pair,
            stream(
                pair,
                [messages],
                variants,
                direction=steering,
                layers=request["layers"],
                sampling=sampling,
                static=ui.static_decoding(pair),
            ),
            slots,
        )
        live.empty()

state = st.session_state.steer_result
if state is not None and state["rows"]:
    columns = st.columns(len(state["rows"]))
    for row, column, title in zip(state["rows"], columns, state["titles"]):
        with column.container(border=True):
            st.markdown(f"**{title}**")
            st.text(row.text or "(empty answer)")
            st.caption(f"{len(row.token_ids)} tokens, stopped by {row.finish_reason}")
    steered = state["request"]["layers"]
    calibrated = has_anchors(direction)
    series = {
        title: (direction.calibrate(row.prompt_projection).tolist() if calibrated else row.prompt_projection)
        for title, row in zip(state["titles"], state["rows"])
    }
    st.plotly_chart(
        plots.projection_figure(
            list(range(pair.n_layers)),
            series,
            calibrated,
            steered=(steered[0], steered[-1]),
            title="Prompt-stage projection of each variant, with its steering"
            + (" (calibrated: 0 = aligned mean, 1 = misaligned mean)" if calibrated else ""),
        )
    )
