"""Evaluate: bidirectional validation of the direction, EM and coherence under steering and ablation."""

from datetime import datetime
from pathlib import Path

import pandas as pd
import streamlit as st

import ui
from core import plots
from core.cache import atomic_write
from core.data import dataset_hash, load_questions
from core.em import COHERENT_MIN, EM_ALIGNED_MAX, judge_table, report_table
from core.errors import InputError
from core.generation import Sampling
from core.judge import JudgeConfig, JudgeError
from core.models import ASSETS
from core.parsing import parse_numbers
from core.runs import SWEEP_HTML, list_runs, new_run_dir, runs_dir
from core.sweep import RunResults, load_run_results, sweep_run

ui.init_session()  # a page opened by its own URL runs without app.py

HOW_TO = (
    "# the bidirectional sweep in one command: generate every cell, judge, EM report, figure\n"
    "python -m core sweep --direction cache/directions/<file>.safetensors --layers 10,15,20 --alphas 1,2,4 \\\n"
    "    --judge-model gpt-4o-2024-08-06 --samples 2      # key from OPENAI_API_KEY\n"
    "# or step by step\n"
    "python -m core generate-eval --variants base,finetuned,base+4,finetuned-4 "
    "--direction <file>.safetensors --layer 12\n"
    "python -m core judge cache/runs/<run> --judge-model gpt-4o-2024-08-06\n"
    "python -m core em cache/runs/<run>"
)
PERCENT = st.column_config.NumberColumn(format="%.3f")


def show_run(results: RunResults) -> None:
    report, cells = results.report, results.cells
    source = {
        "judgements.jsonl": "recomputed from the judgements",
        "em.json": "from em.json (no judged answers here)",
        "sweep.json": "from sweep.json (no judged answers here)",
    }[results.source]
    pair = results.meta.get("pair") or {}
    details = [f"**{results.run.name}**", source]
    if pair:
        details.append(f"{pair.get('base')} → {pair.get('finetuned')}")
    if report:
        details.append(f"{report.n_rows} answers, {report.n_unjudged} not judged")
    if results.sweep and results.sweep.judge.get("model"):
        details.append(f"judge {results.sweep.judge['model']}")
    st.caption(" · ".join(details))

    st.subheader("EM and coherence against α")
    if any(c.mode in ("induce", "restore", "ablate") for c in cells):
        st.caption(
            "Induce = base + α·d, restore = fine-tuned − α·d (α = 0: the unsteered model); ✕ ablation; dashed: "
            "the norm-matched random vector. Wilson 95% intervals, unscored rows excluded."
        )
        st.plotly_chart(plots.sweep_figure(cells))
    else:
        st.info("This run has no steered or ablated cells (a `generate-eval` run): see the table.")

    st.subheader("Per condition")
    if report:
        st.caption(report.unscored_policy[:1].upper() + report.unscored_policy[1:] + ".")
        table = pd.DataFrame(report_table(report, per_question=False))
    else:
        table = pd.DataFrame([c.table_row() for c in cells])
    st.dataframe(
        table,
        hide_index=True,
        key="evaluate_table",
        column_config={c: PERCENT for c in table.columns if "rate" in c or "_ci_" in c},
    )
    per_judge = judge_table(report) if report else []
    if per_judge:
        st.caption("EM rate (unscored excluded) by each judge, and its spread across the judges.")
        st.dataframe(
            pd.DataFrame(per_judge),
            hide_index=True,
            key="evaluate_judges",
            column_config={c: PERCENT for c in per_judge[0] if c != "condition"},
        )

    st.subheader("Judged answers")
    if results.answers:
        st.caption(
            f"One point per judged answer; shaded: EM (aligned ≤ {EM_ALIGNED_MAX:g} and coherent > "
            f"{COHERENT_MIN:g}). Hover for the question and answer."
        )
        st.plotly_chart(plots.judged_scatter(results.answers, EM_ALIGNED_MAX, COHERENT_MIN))
    else:
        st.info("No judged answers in this folder to plot.")


def parse_job(form: dict) -> dict:
    """The form's text fields checked and converted (before anything is loaded or generated)."""
    if not form["judge_model"].strip():
        raise InputError("Name the judge model (e.g. gpt-4o-2024-08-06, or the model a local server serves).")
    alphas = parse_numbers(form["alphas"], "alphas")
    if not any(alphas):
        raise InputError("alphas: give at least one non-zero α, e.g. 2,4")
    return {"layers": parse_numbers(form["layers"], "layers", int), "alphas": alphas}


def run_job(form: dict, upload) -> tuple[Path, str | None] | None:
    """Generate, judge and report a small sweep; returns the run folder it wrote (and opened) and, when the
    judge failed on some requests, what that means and how to retry them."""
    with ui.guard():
        job = parse_job(form)
        questions_path = Path(form["questions"].strip()) if not upload else None
        if upload is None:
            if not form["questions"].strip():
                raise InputError("Give a question set YAML (a path) or upload one.")
            questions = load_questions(questions_path)
        pair = ui.get_pair()
        if pair is None:
            st.info("Pick a model pair that loads on the **Model pair** page.")
            return None
        direction = ui.current_direction(pair)
        if direction is None:
            raise InputError("No direction chosen: choose or build one on the Model pair page first.")
        layers = job["layers"] or [pair.n_layers // 2]
        for layer in layers:
            pair.check_layer(layer)
        out = new_run_dir(ui.cache_root(), "sweep")
        if upload is not None:  # kept with the run, so the run says what it asked
            questions_path = out / "questions.yaml"
            atomic_write(questions_path, upload.getvalue())
            questions = load_questions(questions_path)
        if form["max_questions"]:
            questions = questions[: form["max_questions"]]
        config = JudgeConfig(
            model=form["judge_model"].strip(),
            base_url=form["base_url"].strip() or None,
            api_key=form["api_key"] or None,
            concurrency=8,
            max_retries=2,
            backoff_s=0.5,
        )
        generating = st.progress(0.0, text="generating answers ...")
        judging = st.progress(0.0, text="judging (after generation)")
        try:
            result = sweep_run(
                pair,
                questions,
                direction,
                layers,
                job["alphas"],
                out,
                config,
                Sampling(1.0, 1.0, form["max_new_tokens"], form["seed"]),
                form["samples"],
                form["controls"],
                provenance={
                    "questions": str(questions_path),
                    "questions_sha256": dataset_hash(questions_path),
                    "n_questions": len(questions),
                    "started_from": "dashboard",
                },
                generate_progress=ui.progress_callback(generating, "answers generated"),
                judge_progress=ui.progress_callback(judging, "judgements"),
            )
        except JudgeError as err:
            raise InputError(
                f"{err}. The answers are kept in {out}; judge them later with "
                f"`python -m core judge {out} --judge-model {config.model}`."
            ) from None
        atomic_write(out / SWEEP_HTML, plots.figure_html(plots.sweep_figure(result.cells)))
        st.session_state.evaluate_run = str(out)
        judge = result.judge
        if not judge["failed"]:
            return out, None
        return out, (
            f"The judge failed on {judge['failed']} of {judge['requested']} requests "
            f"({'; '.join(judge['errors']) or 'no detail'}). Those answers count as unscored (both ways "
            f"shown below); `python -m core judge {out} --judge-model {config.model}` retries only them."
        )
    return None


def run_label(path: str) -> str:
    folder = Path(path)
    files = [f for f in folder.iterdir() if f.is_file()] if folder.is_dir() else []
    when = max((f.stat().st_mtime for f in files), default=None)
    return folder.name + (f" · {datetime.fromtimestamp(when):%Y-%m-%d %H:%M}" if when else "")


def show_runs(root: Path) -> None:
    """A picker of the cached runs (newest first; the session's run chosen) and the chosen run, or how to
    make one."""
    runs = [str(p) for p in list_runs(root)]
    if not runs:
        st.info(
            f"No evaluation run in the cache yet ({runs_dir(root)}). Run the small sweep below, or from the "
            "command line:"
        )
        st.code(HOW_TO, language="bash")
        return
    chosen = st.session_state.evaluate_run
    run = st.selectbox(
        "Run (newest first)", runs, index=runs.index(chosen) if chosen in runs else 0, format_func=run_label
    )
    st.session_state.evaluate_run = run
    results = None
    with ui.guard():
        results = load_run_results(run)
    if results is not None:
        show_run(results)


st.title("Evaluate")
st.caption(
    "Bidirectional validation of the direction: adding it to the base model should induce emergent "
    "misalignment, subtracting or ablating it from the fine-tune should restore alignment, with coherence "
    "tracked and a norm-matched random vector as control."
)
root = ui.cache_root()
runs_view = st.container()  # filled last: a run the sweep below writes opens at once
st.subheader("Run a small sweep")
with st.expander("Generate, judge and report on the current pair and direction", expanded=not list_runs(root)):
    ui.job_caption(
        "Every cell (induce, restore, ablate at each layer and at all layers, random control, the unsteered "
        "pair) samples each paraphrase at temperature 1, then the judge scores aligned and coherent."
    )
    with st.form("evaluate_job"):
        left, right = st.columns(2)
        judge_model = left.text_input("Judge model", key="evaluate_judge_model", placeholder="gpt-4o-2024-08-06")
        base_url = right.text_input(
            "Judge base URL", key="evaluate_judge_url", placeholder="empty: OpenAI; or e.g. http://127.0.0.1:8000/v1"
        )
        api_key = st.text_input(
            "API key",
            type="password",
            key="evaluate_api_key",
            help="empty: the server's OPENAI_API_KEY. Used for this request only: never shown, "
            "logged or written to the cache.",
        )
        left, middle, right = st.columns(3)
        layers = left.text_input("Layers", key="evaluate_layers", placeholder="e.g. 10,15 (empty: the middle layer)")
        alphas = middle.text_input("Alphas", "2,4", key="evaluate_alphas")
        samples = right.number_input("Samples per paraphrase", 1, 100, 1, key="evaluate_samples")
        left, right = st.columns([3, 2])
        questions = left.text_input(
            "Question set YAML", str(ASSETS / "questions" / "core_misalignment.yaml"), key="evaluate_questions"
        )
        upload = right.file_uploader("… or upload one", type=["yaml", "yml"], key="evaluate_upload")
        left, middle, right = st.columns(3)
        max_questions = left.number_input("Questions (the first N; 0 = all)", 0, 10000, 2, key="evaluate_max_questions")
        max_new_tokens = middle.number_input("Max new tokens", 1, 2048, 48, key="evaluate_max_new_tokens")
        seed = right.number_input("Seed", 0, 2**31 - 1, 0, key="evaluate_seed")
        controls = st.checkbox("Norm-matched random-vector control", True, key="evaluate_controls")
        submitted = st.form_submit_button("Run sweep", type="primary", key="evaluate_go")
    finished = None
    if submitted:
        finished = run_job(
            {
                "judge_model": judge_model,
                "base_url": base_url,
                "api_key": api_key,
                "layers": layers,
                "alphas": alphas,
                "samples": int(samples),
                "questions": questions,
                "max_questions": int(max_questions),
                "max_new_tokens": int(max_new_tokens),
                "seed": int(seed),
                "controls": controls,
            },
            upload,
        )
with runs_view:
    if finished is not None:
        out, judge_failures = finished
        st.success(f"Sweep written to {out} and opened.")
        if judge_failures:
            st.error(judge_failures, icon="⚠️")
    show_runs(root)
