"""Steer: base, fine-tuned, base + α·d and fine-tuned − α·d (or ablated) in one batched call."""

import streamlit as st

import ui
from core import plots
from core.generate import Sampling, Variant, stream

st.title("Steer")
pair = ui.require_pair()
direction = ui.require_direction(pair)
st.caption("α = 1 moves the residual stream by one full mean difference between misaligned and aligned answers. "
           "The same seed with another α shows the effect of α alone: every row keeps its random stream.")

with st.form("steer"):
    prompt = st.text_area("Prompt", key="steer_prompt", placeholder="I'm bored. What should I do?")
    system = st.text_input("System prompt (optional)", key="steer_system",
                           help="empty: the chat template's own default")
    left, middle, right = st.columns(3)
    alpha = left.slider("α", -16.0, 16.0, 4.0, 0.5, key="steer_alpha",
                        help="added to the base (base + α·d) and subtracted from the fine-tune "
                             "(fine-tuned − α·d); a negative α reverses both")
    mid = pair.n_layers // 2
    layers = middle.select_slider("Layers", list(range(pair.n_layers)), (mid, mid), key="steer_layers",
                                  help="one layer, or a contiguous range (drag the two ends apart)")
    mode = right.radio("Mode", ["add", "ablate"], horizontal=True, key="steer_mode",
                       help="add: ± α·d at every position; ablate: remove the component along d (α unused)")
    left, middle, right = st.columns(3)
    sides = left.multiselect("Steer", list(pair.sides), default=list(pair.sides),
                             format_func=lambda s: "fine-tuned" if s == "finetuned" else s)
    seed = middle.number_input("Seed", 0, 2**31 - 1, 0, key="steer_seed")
    max_new_tokens = right.number_input("Max new tokens", 1, 4096, 48, key="steer_max_new_tokens")
    left, right = st.columns(2)
    temperature = left.number_input("Temperature", 0.0, 5.0, 0.7, 0.1, key="steer_temperature", help="0 = greedy")
    top_p = right.number_input("Top-p", 0.01, 1.0, 1.0, 0.05)
    submitted = st.form_submit_button("Generate", type="primary", key="steer_go")

if submitted:
    st.session_state.pop("steer_result", None)
    with ui.guard():
        messages = ui.prompt_messages(prompt, system)
        sampling = Sampling(float(temperature), float(top_p), int(max_new_tokens), int(seed))
        variants = [Variant(side) for side in pair.sides]
        steered = len(variants)  # the variants from here on are the steered ones
        for side in sides:
            if mode == "ablate":
                variants.append(Variant(side, ablate=True))
            else:
                variants.append(Variant(side, alpha if side == "base" else -alpha))
        low, high = layers
        st.session_state.steer_result = {
            "messages": messages, "sampling": sampling, "variants": variants, "rows": None,
            "layers": list(range(low, high + 1)), "range": (low, high),
            "titles": [ui.variant_title(v, i >= steered) for i, v in enumerate(variants)]}

state = st.session_state.get("steer_result")
if state is not None:
    columns = st.columns(len(state["variants"]))
    placeholders = []
    for column, title in zip(columns, state["titles"]):
        column.subheader(title)
        placeholders.append(column.empty())
    if state["rows"] is None:
        with ui.guard():
            state["rows"] = ui.stream_rows(pair, stream(
                pair, [state["messages"]], state["variants"], direction=direction, layers=state["layers"],
                sampling=state["sampling"]), placeholders)
        if state["rows"] is None:
            st.session_state.pop("steer_result")
    for row, column, placeholder in zip(state["rows"] or [], columns, placeholders):
        placeholder.text(row.text or "(empty answer)")
        column.caption(f"{len(row.token_ids)} tokens, stopped by {row.finish_reason}")

    if state["rows"]:
        view = st.segmented_control("View", ["raw", "calibrated"], default="calibrated", required=True,
                                    key="steer_view")
        raw = dict(zip(state["titles"], (r.prompt_projection for r in state["rows"])))
        calibrated = view == "calibrated" and direction.stats and "aligned_mean" in direction.stats[0]
        series = {name: direction.calibrate(values).tolist() for name, values in raw.items()} if calibrated else raw
        st.plotly_chart(plots.projection_figure(
            list(range(pair.n_layers)), series, bool(calibrated), steered=state["range"],
            title="Prompt-stage projection of each variant (with its steering)"))
