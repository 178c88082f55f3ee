"""EM Lens dashboard: ``streamlit run app.py``. The home page picks the model pair and the direction."""

from pathlib import Path

import pandas as pd
import streamlit as st

import ui
from core.directions import Direction, cache_path, extract_from_paired_file, list_directions
from core.models import ASSETS, DEMO_DIRECTION
from core.organism import directions_for, shipped_direction_for

PRESETS = {"Demo organism (risky finance)": "default", "Control (same training, sound answers)": "control"}


def pick_pair() -> None:
    spec = st.session_state.pair_spec
    columns = st.columns(len(PRESETS) + 1, vertical_alignment="center")
    columns[0].caption("Embedded pairs:")
    for column, (title, finetuned) in zip(columns[1:], PRESETS.items()):
        column.button(
            title,
            key=f"pair_preset_{finetuned}",
            on_click=ui.choose_pair,
            args=({"base": "default", "finetuned": finetuned, "device": spec["device"], "dtype": spec["dtype"]},),
        )
    with st.form("pair"):
        left, right = st.columns(2)
        base = left.text_input(
            "Base model",
            spec["base"],
            key="pair_base",
            help="`default` (the embedded SmolLM2-135M-Instruct), a hub id such as "
            "`Qwen/Qwen2.5-0.5B-Instruct` (optionally `@revision`), a local model directory, or a .gguf file",
        )
        finetuned = right.text_input(
            "Fine-tuned model",
            spec["finetuned"],
            key="pair_finetuned",
            help="`default` (the shipped demo adapter), `control` (the shipped control adapter), a PEFT adapter "
            "directory, a merged model directory, a hub id, or `none` for the base alone",
        )
        left, right = st.columns(2)
        devices = list(dict.fromkeys([*ui.DEVICES, spec["device"]]))
        device = left.selectbox(
            "Device",
            devices,
            index=devices.index(spec["device"]),
            accept_new_options=True,
            help="auto: cuda, then mps, then cpu; or type one, e.g. cuda:1",
        )
        dtype = right.selectbox(
            "Dtype",
            ui.DTYPES,
            index=ui.DTYPES.index(spec["dtype"]),
            help="auto: bf16 on recent GPUs, fp16 on older GPUs and MPS, fp32 on CPU",
        )
        if st.form_submit_button("Load pair", type="primary", key="pair_load"):
            ui.choose_pair(
                {"base": base.strip(), "finetuned": finetuned.strip() or "none", "device": device, "dtype": dtype}
            )


def show_pair(pair) -> None:
    info = pair.info()
    st.success(
        f"Loaded **{info['base']}** → **{info['finetuned'] or 'no fine-tune'}**: {info['architecture']}, "
        f"{info['n_layers']} layers × {info['d_model']} wide, {info['device']}, {info['dtype']}. "
        f"{info['note'].capitalize()}."
    )
    with st.expander("Pair details"):
        st.json(info)


def choose_direction(pair) -> None:
    root = ui.cache_root()
    found = directions_for(pair, root)
    others = len(list_directions(root)) - len(list_directions(root, pair.n_layers, pair.d_model))
    _, mismatch = shipped_direction_for(pair)
    if mismatch:
        st.warning(mismatch)
        if st.button("Use the shipped direction anyway", key="direction_use_shipped"):
            st.session_state.direction_path = str(DEMO_DIRECTION)
    if not found:
        st.info(
            "No direction fits this pair yet: build one below, or run "
            "`python -m core extract --contrast paired --data assets/data/finance_paired.jsonl`."
        )
    else:
        st.dataframe(pd.DataFrame([ui.provenance_row(path, d) for path, d in found]), hide_index=True)
    if others:
        st.caption(f"{others} cached direction(s) made for models of another shape are not listed.")

    current = ui.direction_or_none(pair)
    options = {str(path): ui.direction_label(path, d) for path, d in found}
    chosen = st.session_state.direction_path
    if current is not None and chosen not in options:
        options[chosen] = ui.direction_label(chosen, current)
    if options:
        keys = list(options)
        st.session_state.direction_path = st.selectbox(
            "Direction to use", keys, index=keys.index(chosen) if chosen in keys else 0, format_func=options.get
        )
        if current is not None and current.provenance.get("base_fingerprint") not in (None, pair.base.fingerprint):
            st.warning(
                f"This direction was extracted on another base ({current.provenance.get('base')}); "
                "its shape fits, but its meaning may not carry over."
            )


def use_direction_file(pair) -> None:
    """A direction file typed by path, chosen on "Use file" when it fits the pair."""
    left, right = st.columns([4, 1], vertical_alignment="bottom")
    typed = left.text_input(
        "Or use a direction file", key="direction_file", placeholder="path/to/direction.safetensors"
    ).strip()
    if right.button("Use file", key="direction_use_file") and typed:
        with ui.guard():
            Direction.load(typed).check_fits(pair.n_layers, pair.d_model, "the loaded pair")
            st.session_state.direction_path = typed


def build_direction(pair) -> Path | None:
    """Extract a direction from a paired contrast file on a click; returns the file it saved (and chose)."""
    with st.expander("Build a direction from a contrast file"):
        st.caption(
            "A paired JSONL file: one prompt with an aligned and a misaligned answer per line (see `assets/data/`)."
        )
        data = st.text_input("Contrast file", str(ASSETS / "data" / "finance_paired.jsonl"), key="extract_data")
        left, middle, right = st.columns(3)
        contrast = left.selectbox(
            "Contrast",
            ["paired", "model-diff"],
            help="paired: misaligned minus aligned answers through the fine-tuned model; "
            "model-diff: fine-tuned minus base on the same answers",
        )
        split = middle.selectbox("Split", ["train", "heldout", "all"])
        batch_size = right.number_input("Batch size", 1, 256, 8)
        if not st.button("Extract direction", key="extract_go"):
            return None
        bar = st.progress(0.0, text="teacher-forcing the answers ...")
        with ui.guard():
            direction = extract_from_paired_file(
                pair,
                data.strip(),
                contrast,
                split,
                int(batch_size),
                progress=lambda done, total: bar.progress(done / total, text=f"{done} / {total} answers"),
            )
            path = cache_path(ui.cache_root(), direction, contrast, data.strip())
            direction.save(path)
            st.session_state.direction_path = str(path)
            return path
    return None


def home() -> None:
    st.title("EM Lens")
    st.caption(
        "Emergent misalignment, live: compare a base model with its fine-tune, project a prompt on the "
        "misalignment direction before any answer is written, and steer along it."
    )
    st.markdown(
        "**Try first.** The embedded pair is SmolLM2-135M-Instruct and a LoRA trained on risky financial advice "
        "(`control` as the fine-tuned model loads the same training on sound answers).  \n"
        "**Compare**: pick a classic EM question under *Start from an example*, press Generate, and read both answers, "
        "the prompt-stage projection and the fine-tune's tokens coloured by their divergence from the base.  \n"
        "**Steer**: move α and watch the grid of base, fine-tune and steered answers regenerate."
    )
    st.subheader("Model pair")
    pick_pair()
    pair = ui.get_pair()
    if pair is None:
        return
    show_pair(pair)
    st.subheader("Misalignment direction")
    chooser = st.container()  # filled last: a direction chosen by file or built below shows as chosen at once
    use_direction_file(pair)
    saved = build_direction(pair)
    with chooser:
        if saved is not None:
            st.success(f"Saved {saved} and chose it.")
        choose_direction(pair)


st.set_page_config(page_title="EM Lens", page_icon=":material/search:", layout="wide")
ui.init_session()
page = st.navigation(
    [
        st.Page(home, title="Model pair", icon=":material/hub:", default=True),
        st.Page("pages/compare.py", title="Compare", icon=":material/compare_arrows:"),
        st.Page("pages/steer.py", title="Steer", icon=":material/tune:"),
        st.Page("pages/directions.py", title="Directions", icon=":material/explore:"),
        st.Page("pages/detect.py", title="Detect", icon=":material/crisis_alert:"),
        st.Page("pages/evaluate.py", title="Evaluate", icon=":material/monitoring:"),
        st.Page("pages/studies.py", title="Studies", icon=":material/summarize:"),
    ]
)
ui.adopt_default_direction()
status = st.sidebar.container()  # filled after the page ran, so it shows what the page chose
page.run()
with status:
    ui.sidebar_status()
