"""Studies: the three phases of a study (directions, steering both ways, early detection) and their
shareable reports. The work is core.study's; this page lists, opens and starts studies."""

from dataclasses import replace
from datetime import datetime

import pandas as pd
import streamlit as st
import streamlit.components.v1 as components

import ui
from core.study import REPORT_HTML, SMALL, list_studies, new_study_dir, run_study

ui.init_session()  # a page opened by its own URL runs without app.py

STATES = {
    "done": "✅ done",
    "running": "⏳ running",
    "interrupted": "⏸ interrupted (rerun to continue)",
    "failed": "❌ failed",
}


def when(seconds) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M") if seconds else "–"


def show_studies(root) -> None:
    entries = list_studies(root)
    if not entries:
        st.info(
            "No studies yet: start a small one below, or run "
            "`python -m core study --preset demo` (judge-free, the embedded pair)."
        )
        return
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "study": e.path.name,
                    "state": STATES.get(e.state, e.state),
                    "base": e.base,
                    "fine-tune": e.finetuned,
                    "judge": e.judge or "none (judge-free)",
                    "phases done": len(e.phases_done),
                    "progress": e.progress,
                    "started": when(e.started),
                    "minutes": None if e.seconds is None else round(e.seconds / 60, 1),
                }
                for e in entries
            ]
        ),
        hide_index=True,
        column_config={"progress": st.column_config.ProgressColumn(min_value=0, max_value=1)},
    )
    for e in entries:
        if e.state == "running":
            st.progress(e.progress or 0.0, text=f"{e.path.name}: {e.label or 'starting'}")
    finished = [e for e in entries if e.has_report]
    if not finished:
        return
    names = [e.path.name for e in finished]
    last = st.session_state.studies_last
    chosen = st.selectbox("Open a report", names, index=names.index(last) if last in names else 0, key="studies_open")
    entry = finished[names.index(chosen)]
    page = (entry.path / REPORT_HTML).read_text()
    st.download_button(
        "Download report.html (opens offline)",
        page,
        file_name=f"{entry.path.name}.html",
        mime="text/html",
        key="studies_download",
    )
    st.caption(f"Folder: `{entry.path}` (report.json beside it holds the same numbers).")
    components.html(page, height=900, scrolling=True)


def start_small_study(root) -> None:
    ui.job_caption(
        "Judge-free: paired and model-difference directions, preference shifts under steering "
        "both ways with a random control, and the detection report. A few minutes on a CPU."
    )
    left, middle, right = st.columns(3)
    n_general = left.number_input("General prompts", 16, 96, SMALL.n_general, 8, key="studies_general")
    n_heldout = middle.number_input("Narrow held-out pairs", 8, 70, SMALL.n_heldout, 4, key="studies_heldout")
    n_layers = right.number_input("Steering layers", 1, 6, SMALL.n_layers, 1, key="studies_layers")
    if not st.button("Start a small study", type="primary", key="studies_go"):
        return
    pair = ui.get_pair()
    if pair is None:
        st.info("Pick a model pair that loads on the **Model pair** page.")
        return
    with ui.guard():
        config = replace(SMALL, n_general=int(n_general), n_heldout=int(n_heldout), n_layers=int(n_layers))
        out = new_study_dir(root)
        bar = st.progress(0.0, text="starting the study ...")
        spec = st.session_state.pair_spec
        run_study(
            pair,
            out,
            config,
            progress=lambda fraction, label: bar.progress(min(fraction, 1.0), text=label),
            spec={"base": spec["base"], "finetuned": spec["finetuned"]},
        )
        st.session_state.studies_last = out.name
        st.success(f"Study finished: {out}")


st.title("Studies")
st.caption(
    "A study answers the research question in one go: (1) the direction per layer from every available "
    "contrast, with cross-fitted statistics; (2) steering both ways against a norm-matched random vector; "
    "(3) whether the last prompt token predicts misaligned answers — and writes one self-contained report "
    "to share. Without a judge a study is judge-free end to end, and its report says so."
)
root = ui.cache_root()
listing = st.container()  # filled last: a study started below shows up at once
st.subheader("Start a small study on the loaded pair")
with st.expander("Judge-free, small sizes", expanded=False):
    start_small_study(root)
with listing:
    show_studies(root)
