"""Compare: where a prompt already sits along the direction, then both answers side by side."""

import numpy as np
import streamlit as st

import ui
from core import calibration, plots
from core.cache import Cache
from core.divergence import token_divergence
from core.generation import Sampling, Variant, stream
from core.projections import prompt_projections
from core.starters import DEFAULT_COMPARE_PROMPT
from core.steering import variant_title

ui.init_session()  # a page opened by its own URL runs without app.py

KL = "divergence from the base (KL)"

st.title("Compare")
pair = ui.require_pair()
direction = ui.direction_or_none(pair)
if direction is None:
    st.info("No direction chosen: answers only. Choose or build one on the **Model pair** page for projections.")

ui.example_picker("compare")  # outside the form: a callback fills the prompt below
with st.form("compare"):
    prompt = ui.prompt_area("compare", DEFAULT_COMPARE_PROMPT)
    system = st.text_input(
        "System prompt (optional)", key="compare_system", help="empty: the chat template's own default"
    )
    columns = st.columns(5)
    trace_layer = columns[0].selectbox(
        "Colour tokens at layer", range(pair.n_layers), index=pair.n_layers // 2, disabled=direction is None
    )
    temperature = columns[1].number_input("Temperature", 0.0, 5.0, 0.7, 0.1, help="0 = greedy")
    top_p = columns[2].number_input("Top-p", 0.01, 1.0, 1.0, 0.05)
    max_new_tokens = columns[3].number_input("Max new tokens", 1, 4096, 64, key="compare_max_new_tokens")
    seed = columns[4].number_input("Seed", 0, 2**31 - 1, 0)
    submitted = st.form_submit_button("Generate", type="primary", key="compare_go")

if submitted:
    st.session_state.compare_result = None
    with ui.guard():
        messages = ui.prompt_messages(prompt, system)
        sampling = Sampling(float(temperature), float(top_p), int(max_new_tokens), int(seed))
        projections = prompt_projections(pair, messages, direction, Cache(ui.cache_root())) if direction else None
        st.session_state.compare_result = {
            "messages": messages,
            "sampling": sampling,
            "projections": projections,
            "anchors": calibration.anchors(direction, trace_layer) if direction else None,
            "trace_layer": trace_layer if direction else None,
            "rows": None,
            "divergence": None,
        }

state = st.session_state.compare_result
if state is not None:
    if state["projections"] is not None:
        view = st.segmented_control(
            "View", ["raw", "calibrated"], default="calibrated", required=True, key="compare_view"
        )
        calibrated = view == "calibrated" and state["projections"]["base_calibrated"] is not None
        result = state["projections"]
        series = {
            variant_title(Variant(side)): result[f"{side}_calibrated" if calibrated else side] for side in pair.sides
        }
        st.plotly_chart(
            plots.projection_figure(
                result["layers"],
                series,
                calibrated,
                title="Prompt-stage projection (last prompt token, before any answer)",
            )
        )
        if view == "calibrated" and not calibrated:
            st.caption("This direction has no set means to calibrate against: showing raw projections.")

    sides = list(pair.sides)
    columns = st.columns(len(sides))
    placeholders = []
    for column, side in zip(columns, sides):
        column.subheader(variant_title(Variant(side)))
        placeholders.append(column.empty())
    if state["rows"] is None:
        with ui.guard():
            state["rows"] = ui.stream_rows(
                pair,
                stream(
                    pair,
                    [state["messages"]],
                    [Variant(side) for side in sides],
                    direction=direction,
                    sampling=state["sampling"],
                    trace_layer=state["trace_layer"],
                    static=ui.static_decoding(pair),
                ),
                placeholders,
            )
        if state["rows"] is None:  # it failed: the error is shown; do not retry on the next rerun
            st.session_state.compare_result = None
    for row, column, placeholder in zip(state["rows"] or [], columns, placeholders):
        placeholder.text(row.text or "(empty answer)")
        column.caption(f"{len(row.token_ids)} tokens, stopped by {row.finish_reason}")
        has_projection = row.token_projections is not None
        colour_by = "projection" if has_projection else None
        if row.variant.side == "finetuned" and row.token_ids:
            names = {
                "projection": f"projection at layer {state['trace_layer']}" if has_projection else "no colour",
                "kl": KL,
            }
            colour_by = column.segmented_control(
                "Colour tokens by",
                list(names),
                format_func=names.get,
                default="projection",
                required=True,
                key="compare_colour",
            )
        if colour_by == "kl":
            if state.get("divergence") is None:  # computed once per result, kept across reruns
                with ui.guard(), st.spinner("Teacher-forcing the answer through both models ..."):
                    state["divergence"] = token_divergence(pair, state["messages"], row.token_ids)
            if state.get("divergence") is not None:
                values = state["divergence"]
                column.caption(
                    f"Tokens coloured by KL(fine-tuned ‖ base) of the distribution that predicted them "
                    f"(white: 0, dark red: {plots.divergence_scale(values):.2f} nats or more; hover for "
                    f"the value). Largest {max(values):.3f}, mean {np.mean(values):.3f} nats."
                )
                column.html(plots.divergence_html(ui.token_pieces(pair, row.token_ids), values))
        elif colour_by == "projection" and has_projection:
            values = row.token_projections
            aligned, misaligned = calibration.colour_range(values, state["anchors"])
            column.caption(
                f"Tokens coloured by their projection at layer {state['trace_layer']} "
                "(blue: aligned mean, red: misaligned mean; hover for the value)"
            )
            column.html(plots.token_html(ui.token_pieces(pair, row.token_ids), values, aligned, misaligned))
