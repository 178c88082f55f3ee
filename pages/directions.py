"""Directions: the chosen direction layer by layer, and how it compares with another one."""

from pathlib import Path

import pandas as pd
import streamlit as st

import ui
from core import plots
from core.directions import cosine_per_layer, layer_cosines, list_directions

ui.init_session()  # a page opened by its own URL runs without app.py

st.title("Directions")
pair = ui.require_pair()
direction = ui.require_direction(pair)
path = st.session_state.direction_path
row = ui.provenance_row(path, direction)
st.caption(
    f"**{row['file']}** · {row['method']} · {row['model']} · {row['dataset']} ({row['split']}), "
    f"{row['aligned']} aligned / {row['misaligned']} misaligned answers · {row['created']}"
)
with st.expander("Provenance"):
    st.json(direction.provenance)

st.subheader("Norm and separation per layer")
if direction.stats:
    st.caption(
        "Separation of the per-answer mean projections of the aligned and misaligned sets it was "
        "extracted from (in-sample)."
    )
    st.plotly_chart(plots.direction_stats_figure(direction.stats))
    columns = ["layer", "norm", "auroc", "cohens_d", "aligned_mean", "misaligned_mean"]
    st.dataframe(pd.DataFrame(direction.stats).reindex(columns=columns), hide_index=True)
else:
    st.info("This direction carries no per-layer statistics (e.g. a random control).")

st.subheader("Cosine similarity between layers")
st.plotly_chart(plots.cosine_heatmap(layer_cosines(direction)))

st.subheader("Compare with another direction")
others = [(p, d) for p, d in list_directions(ui.cache_root(), pair.n_layers, pair.d_model) if str(p) != path]
if not others:
    st.info(
        "No other cached direction fits this pair. Extract another (another fine-tune, contrast or dataset) "
        "to compare: across fine-tunes of one base the published cosine is above 0.8."
    )
else:
    labels = {str(p): ui.direction_label(p, d) for p, d in others}
    other_path = st.selectbox("Other direction", list(labels), format_func=labels.get)
    other = dict((str(p), d) for p, d in others)[other_path]
    with ui.guard():
        st.plotly_chart(
            plots.cosine_per_layer_figure(cosine_per_layer(direction, other), Path(path).stem, Path(other_path).stem)
        )
