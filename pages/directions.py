"""Directions: the chosen direction layer by layer, and how it compares with another one."""

from pathlib import Path

import pandas as pd
import streamlit as st

import ui
from core import plots
from core.anatomy import DEFAULT_PROMPTS, READS, Attribution, LensLayer, direct_attribution, logit_lens
from core.cache import Cache
from core.data import load_paired_jsonl
from core.directions import cosine_per_layer, describe_separation, layer_cosines, list_directions
from core.preference import PreferenceError, best_layer
from core.sae import SAELatents, answer_sets, extraction_data, load_sae, sae_latents


def lens_table(lens: LensLayer, side: str) -> None:
    st.dataframe(
        pd.DataFrame(
            {
                "promotes": [repr(t.token) for t in lens.promoted],
                "+ logit": [t.score for t in lens.promoted],
                "suppresses": [repr(t.token) for t in lens.suppressed],
                "− logit": [t.score for t in lens.suppressed],
            }
        ),
        hide_index=True,
        key=f"directions_lens_{side}",
    )


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
    st.caption(describe_separation(direction.stats))
    st.plotly_chart(plots.direction_stats_figure(direction.stats))
    columns = ["layer", "norm", "auroc", "cohens_d", "auroc_insample", "cohens_d_insample"]
    columns += ["aligned_mean", "misaligned_mean"]
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

st.subheader("What the direction is made of")
try:
    suggested = best_layer(direction)
except PreferenceError:  # no cross-fitted statistics to choose from
    suggested = direction.n_layers - 1
layer = st.selectbox("Layer", list(range(direction.n_layers)), index=suggested, key="directions_anatomy_layer")
st.markdown("**Logit lens**")
st.caption(
    "The tokens whose logits a residual pointing along the direction at this layer raises (+) and lowers (−) "
    "most, read through the model's final norm (its gain) and unembedding: the logit change at unit RMS."
)
with ui.guard():
    lenses = {
        side: logit_lens(pair, direction, [layer], side, top_k=10, cache=Cache(ui.cache_root()))[0]
        for side in pair.sides
    }
    first = next(iter(lenses.values()))
    if all((lens.promoted, lens.suppressed) == (first.promoted, first.suppressed) for lens in lenses.values()):
        if len(lenses) > 1:
            st.caption("The same on both sides: the fine-tune leaves the final norm and the unembedding as they were.")
        lens_table(first, "all")
    else:
        for column, (side, lens) in zip(st.columns(len(lenses)), lenses.items()):
            with column:
                st.caption(f"**{side}**")
                lens_table(lens, side)

st.markdown("**Who writes it: direct attribution**")
st.caption(
    "The residual at this layer is the embedding plus every earlier attention head's and MLP's output: each "
    "part's mean projection on the unit direction, over a paired prompt file. The parts add up to the total."
)
with st.form("directions_attribution_form"):
    data = st.text_input("Paired JSONL", value=str(DEFAULT_PROMPTS), key="directions_attribution_data")
    read = st.selectbox("Read at", list(READS), format_func=READS.get, key="directions_attribution_read")
    side = st.selectbox("Side", pair.sides, index=len(pair.sides) - 1, key="directions_attribution_side")
    limit = st.number_input("Records (at most)", 1, 10_000, 32, key="directions_attribution_limit")
    attribute = st.form_submit_button("Attribute", key="directions_attribution_go")
if attribute:
    with ui.guard():
        records = load_paired_jsonl(data.strip())[: int(limit)]
        bar = st.progress(0.0)
        (result,) = direct_attribution(
            pair,
            direction,
            [layer],
            side,
            records,
            read,
            cache=Cache(ui.cache_root()),
            progress=ui.progress_callback(bar, "attribution"),
        )
        bar.empty()
        st.session_state.directions_attribution = {
            "pair_spec": st.session_state.pair_spec,
            "direction_path": path,
            "data": data.strip(),
            "result": result.to_json(),
        }
shown = st.session_state.directions_attribution
if shown and (shown["pair_spec"], shown["direction_path"]) == (st.session_state.pair_spec, path):
    result = Attribution.from_json(shown["result"])
    st.plotly_chart(
        plots.attribution_figure(
            result.heads,
            result.attention,
            result.mlp,
            f"Who writes the direction at layer {result.layer} ({result.side}, {result.read})",
        ),
        key="directions_attribution_chart",
    )
    largest = ", ".join(f"{name} {value:+.3f}" for name, value in result.largest_parts(5))
    st.caption(
        f"{result.n_prompts} records of {Path(shown['data']).name}, {result.n_positions} positions. Total "
        f"{result.total:+.4f} = embedding {result.embedding:+.4f} + attention {sum(result.attention):+.4f} + MLP "
        f"{sum(result.mlp):+.4f} (unexplained {result.unexplained:+.1e}). Largest parts: {largest}."
    )

st.subheader("SAE latents")
st.caption(
    "Which latents of a sparse autoencoder point along the direction at the SAE's layer (decoder cosine), and "
    "which fire differently on the misaligned and the aligned answers (mean activation over answer tokens). "
    "An SAE directory in sae-lens' format (cfg.json + sae_weights.safetensors), or an sae-lens release id "
    "with the SAE's id in it (needs hub access)."
)
extracted = extraction_data(direction)
with st.form("directions_sae_form"):
    sae_spec = st.text_input("SAE directory or sae-lens release", key="directions_sae_spec")
    sae_id = st.text_input("SAE id (releases only)", key="directions_sae_id")
    sae_data = st.text_input(
        "Paired JSONL for the activation contrast (empty: decoder cosines only)",
        value=str(extracted[0]) if extracted else "",
        key="directions_sae_data",
    )
    splits = ["all", "train", "heldout"]
    sae_split = st.selectbox(
        "Split", splits, index=splits.index(extracted[1]) if extracted else 0, key="directions_sae_split"
    )
    sae_limit = st.number_input("Records (at most)", 1, 10_000, 64, key="directions_sae_limit")
    read_latents = st.form_submit_button("Read latents", key="directions_sae_go")
if read_latents:
    with ui.guard():
        sae = load_sae(sae_spec.strip(), sae_id.strip() or None)
        records = (
            load_paired_jsonl(sae_data.strip(), None if sae_split == "all" else sae_split)[: int(sae_limit)]
            if sae_data.strip()
            else []
        )
        aligned, misaligned = answer_sets(records)
        bar = st.progress(0.0)
        result = sae_latents(
            sae,
            direction,
            pair=pair,
            aligned=aligned,
            misaligned=misaligned,
            cache=Cache(ui.cache_root()),
            progress=ui.progress_callback(bar, "SAE latents"),
        )
        bar.empty()
        st.session_state.directions_sae = {
            "pair_spec": st.session_state.pair_spec,
            "direction_path": path,
            "result": result.to_json(),
        }
shown = st.session_state.directions_sae
if shown and (shown["pair_spec"], shown["direction_path"]) == (st.session_state.pair_spec, path):
    result = SAELatents.from_json(shown["result"])
    lookup = f" · Neuronpedia {result.neuronpedia_id}" if result.neuronpedia_id else ""
    st.caption(
        f"{result.sae}: {result.hook_name} (layer {result.layer}), {result.architecture}, "
        f"{result.d_sae} latents{lookup}"
    )
    tables = [("Decoder along the direction", result.toward), ("Decoder against it", result.against)]
    if result.activations:
        contrast = result.activations
        st.caption(
            f"Activation contrast through the {contrast.side} side: {contrast.n_aligned} aligned answers "
            f"({contrast.aligned_tokens} tokens), {contrast.n_misaligned} misaligned "
            f"({contrast.misaligned_tokens} tokens)."
        )
        tables += [
            ("More active on misaligned answers", contrast.more_on_misaligned),
            ("More active on aligned answers", contrast.more_on_aligned),
        ]
    for start in range(0, len(tables), 2):
        for column, (title, rows) in zip(st.columns(2), tables[start : start + 2]):
            with column:
                st.caption(f"**{title}**")
                st.dataframe(pd.DataFrame([row.to_json() for row in rows]), hide_index=True)
