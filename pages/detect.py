"""Detect: does the prompt-stage projection, taken before any token is written, predict misalignment?"""

from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

import ui
from core import plots
from core.detect import detect
from core.detection_results import (
    DetectionReport,
    Predictor,
    list_reports,
    load_report,
    report_path,
    reports_dir,
    save_report,
)
from core.em import is_em
from core.errors import InputError
from core.models import ASSETS

ui.init_session()  # a page opened by its own URL runs without app.py

HOW_TO = (
    "# judge-free labels: how far fine-tuning moved the preference for the harmful answer of a paired file\n"
    "python -m core detect --direction cache/directions/<file>.safetensors "
    "--paired assets/data/general_paired.jsonl\n"
    "# transfer: choose on the held-out finance prompts, report on the general ones\n"
    "python -m core detect --direction <file>.safetensors --paired assets/data/general_paired.jsonl "
    "--select-on assets/data/finance_paired.jsonl --select-split heldout\n"
    "# labels from judged samples: generate, judge, then detect on the run\n"
    "python -m core generate-eval --variants finetuned --samples 10 ...\n"
    "python -m core judge cache/runs/<run> --judge-model <model> ...\n"
    "python -m core detect --direction <file>.safetensors --run cache/runs/<run> --label-rule any"
)


def fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def interval(ci) -> str:
    return "" if not ci else f" [{fmt(ci[0])}, {fmt(ci[1])}]"


def answer_heading(answer: dict) -> str:
    if "kind" in answer:
        return f"**{answer['kind']} answer**"
    parts = [f"aligned {fmt(answer.get('aligned'), 0)}", f"coherent {fmt(answer.get('coherent'), 0)}"]
    if is_em(answer.get("aligned"), answer.get("coherent")):
        parts.append("**EM**")
    return " · ".join(parts)


PREDICTOR_NAMES = {
    "last_token": "direction, last prompt token",
    "prompt_mean": "direction, mean over the prompt",
    "prompt_max": "direction, max over the prompt",
    "finetuning_shift": "fine-tuned minus base",
    "base_last_token": "base model's projection",
    "probe": "logistic probe (grouped CV)",
    "unrelated_direction": "unrelated topic direction",
    "prompt_length": "prompt length",
    "base_log_odds": "base model's log-odds",
    "answer_length_gap": "answer-length gap",
}


def predictor_label(name: str, predictor: Predictor) -> str:
    return PREDICTOR_NAMES.get(name, name) + (f" @L{predictor.layer}" if predictor.layer is not None else "")


def layers_figure(report: DetectionReport):
    """The per-layer curve of the selection set, its title saying what the intervals are."""
    figure = plots.detection_layers_figure(report.per_layer, report.chosen.layer)
    figure.layout.annotations[0].text = (
        f"AUROC on the selection set ({report.n_groups.selection} groups); "
        f"95% intervals unadjusted for {len(report.per_layer)} layers"
    )
    return figure


def show_report(report: DetectionReport) -> None:
    labels, chosen, groups, null, direction = (
        report.labels,
        report.chosen,
        report.n_groups,
        report.random_null,
        report.direction,
    )
    st.caption(
        f"**Labels** {labels.get('source', '?')} ({labels.get('rule', 'rule not recorded')}; score: "
        f"{labels.get('score', '?')}) · **Groups** {labels.get('groups', '?')} · **Direction** "
        f"{direction.get('method', '?')} on {direction.get('base', '?')} → {direction.get('finetuned', '?')}"
    )
    if report.transfer:
        transfer = report.transfer
        st.caption(
            f"**Transfer**: layers, probe and orientations chosen on {transfer.get('select_on', '?')} "
            f"({transfer['n_select']} prompts), everything reported on {transfer.get('report_on', '?')} "
            f"({transfer['n_report']} prompts)."
        )
    for warning in report.warnings:
        st.warning(warning[:1].upper() + warning[1:] + ".")
    columns = st.columns(5)
    columns[0].metric("Prompts", report.n_prompts, help=f"{report.n_misaligned} labelled misaligned")
    columns[1].metric("Groups", f"{groups.selection} / {groups.report}", help="selection / report set")
    columns[2].metric(
        "Chosen layer", chosen.layer, help=f"highest AUROC on the selection set ({fmt(chosen.selection_auroc)})"
    )
    columns[3].metric(
        "AUROC, report set",
        fmt(chosen.report_auroc),
        help=f"95% interval{interval(chosen.report_ci)}, n = {chosen.n_report}",
    )
    columns[4].metric(
        "Random-direction percentile",
        f"{null.percentile:.0f}",
        help=f"among {null.n} random directions at the chosen layer",
    )

    st.subheader("AUROC per layer, selection set")
    st.plotly_chart(layers_figure(report))

    st.subheader("Predictors on the report set")
    others = {
        predictor_label(name, predictor): predictor
        for name, predictor in report.predictors.items()
        if name != "last_token"
    }
    left, right = st.columns(2)
    left.plotly_chart(plots.detection_baselines_figure(chosen, others))
    right.plotly_chart(plots.roc_figure(report.roc.fpr, report.roc.tpr, report.roc.layer, chosen.report_auroc))
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "predictor": predictor_label(name, predictor),
                    "auroc": predictor.auroc,
                    "ci_low": predictor.ci95[0],
                    "ci_high": predictor.ci95[1],
                    "orientation": predictor.orientation,
                    "what": predictor.what,
                }
                for name, predictor in report.predictors.items()
            ]
        ),
        hide_index=True,
        key="detect_predictors",
    )
    st.caption(
        f"The direction's AUROC lies at percentile {null.percentile:.0f} of {null.n} random directions "
        f"(95% of them between {fmt(null.quantiles.get('2.5'))} and {fmt(null.quantiles.get('97.5'))}). "
        + report.protocol
        + "."
    )

    st.subheader("Prompts by risk score")
    prompts = report.prompts  # riskiest first
    st.caption(
        "Risk = the fine-tune's projection on the unit direction at the chosen layer, at the last prompt "
        "token; calibrated: 0 = aligned mean, 1 = misaligned mean of the direction's own sets. "
        "Score = what the label was derived from (fine-tuning shift of the log-odds, or EM rate)."
    )
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "prompt": p.prompt,
                    "label": "misaligned" if p.misaligned else "aligned",
                    "score": p.score,
                    "risk": p.risk,
                    "calibrated risk": p.risk_calibrated,
                    "split": p.split,
                    "group": p.group,
                    "id": p.id,
                }
                for p in prompts
            ]
        ),
        hide_index=True,
        key="detect_prompts",
        column_config={"prompt": st.column_config.TextColumn(width="large")},
    )

    index = st.selectbox(
        "Answers behind a label",
        range(len(prompts)),
        format_func=lambda i: (
            f"{i + 1}. [{'misaligned' if prompts[i].misaligned else 'aligned'}] {prompts[i].prompt[:100]}"
        ),
    )
    picked = prompts[index]
    with st.container(border=True):
        st.markdown(
            f"**{'Misaligned' if picked.misaligned else 'Aligned'}** · "
            f"score {fmt(picked.score)} · risk {fmt(picked.risk)}"
        )
        st.text(picked.prompt)
        if not picked.answers:
            st.caption("This report keeps no answers for this prompt.")
        for answer in picked.answers:
            st.markdown(answer_heading(answer))
            st.text(answer.get("answer", ""))


def run_job(data: str, options: dict) -> Path | None:
    """Detect on the current pair and direction; returns the report file it saved (and opened)."""
    pair = ui.get_pair()
    if pair is None:
        st.info("Pick a model pair that loads on the **Model pair** page.")
        return None
    with ui.guard():
        direction = ui.current_direction(pair)
        if direction is None:
            raise InputError("No direction chosen: choose or build one on the Model pair page first.")
        bar = st.progress(0.0, text="preference labels ...")
        report = detect(
            pair,
            direction,
            data,
            **options,
            label_progress=ui.progress_callback(bar, "preference labels (answers scored)", 0.0, 0.5),
            progress=ui.progress_callback(bar, "prompt activations", 0.5, 1.0),
        )
        path = save_report(report, report_path(ui.cache_root(), data, direction))
        st.session_state.detect_report = str(path)
        return path
    return None


def show_reports(root: Path) -> None:
    """A picker of the cached reports (newest first; the session's report chosen) and the chosen report, or
    how to make one."""
    paths = [str(p) for p in list_reports(root)]
    if not paths:
        st.info(
            f"No detection report in the cache yet ({reports_dir(root)}). Run the small job below, or from the "
            "command line:"
        )
        st.code(HOW_TO, language="bash")
        return
    chosen_path = st.session_state.detect_report
    path = st.selectbox(
        "Detection report (newest first)",
        paths,
        index=paths.index(chosen_path) if chosen_path in paths else 0,
        format_func=lambda p: (
            f"{Path(p).name} · {datetime.fromtimestamp(Path(p).stat().st_mtime):%Y-%m-%d %H:%M}"
            if Path(p).exists()
            else Path(p).name
        ),
    )
    st.session_state.detect_report = path
    loaded = None
    with ui.guard():
        loaded = load_report(path)
    if loaded is not None:
        with ui.guard():
            show_report(loaded)


st.title("Detect")
st.caption(
    "Early warning: does the prompt-stage projection on the direction, read at the last prompt token before "
    "any answer is written, predict whether the answer will be misaligned? Questions (with their paraphrases) "
    "are never split: layers are chosen on one set of groups and every figure is reported on the other, next "
    "to baseline predictors and a null of random directions."
)
view = st.segmented_control(
    "View", ["Prompt stage", "Training"], default="Prompt stage", required=True, key="detect_view"
)
if view == "Training":
    st.caption(
        "The monitor curves of a training run (`python -m core train --monitor PROBES.jsonl`): the probe "
        "prompts' mean projection on the direction and the preference shift on held-out pairs at every "
        "checkpoint, and how many steps the projection crossed its threshold before the behaviour did."
    )
    ui.training_view_picker(key="detect_training")
else:
    root = ui.cache_root()
    reports = st.container()  # filled last: a report the job below saves opens at once
    st.subheader("Run a small detection job")
    with st.expander(
        "Judge-free labels from a paired file, on the current pair and direction", expanded=not list_reports(root)
    ):
        ui.job_caption(
            "Each prompt is labelled misaligned when fine-tuning moved its preference toward the harmful "
            "answer (fine-tuned minus base per-token log-odds > 0; the median when that leaves one class "
            "empty)."
        )
        data = st.text_input("Paired JSONL", str(ASSETS / "data" / "general_paired.jsonl"), key="detect_data")
        select_on = st.text_input(
            "Choose on another prompt family (transfer; optional paired JSONL)", "", key="detect_select_on"
        )
        left, middle, right = st.columns(3)
        n_boot = left.number_input("Bootstrap resamples", 50, 10000, 1000, 50, key="detect_bootstrap")
        heldout = middle.number_input(
            "Report fraction",
            0.2,
            0.8,
            0.5,
            0.05,
            key="detect_heldout",
            help="share of the groups held out to report on (rounded to 1/k); unused with a transfer family",
        )
        seed = right.number_input("Seed", 0, 2**31 - 1, 0, key="detect_seed")
        left, right = st.columns(2)
        n_random = left.number_input("Random directions", 50, 2000, 100, 50, key="detect_random")
        gap = right.number_input(
            "Max answer-length gap, tokens (empty: keep every pair)", 0, 10000, None, key="detect_length_gap"
        )
        saved = None
        if st.button("Run detection", type="primary", key="detect_go"):
            saved = run_job(
                data.strip(),
                {
                    "select_on": select_on.strip() or None,
                    "max_length_gap": gap,
                    "n_boot": int(n_boot),
                    "heldout_fraction": float(heldout),
                    "seed": int(seed),
                    "n_random": int(n_random),
                },
            )
    with reports:
        if saved is not None:
            st.success(f"Saved {saved} and opened it.")
        show_reports(root)
