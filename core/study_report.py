"""A study's report: ``report.json`` (the numbers, for scripts) and ``report.html`` (one
self-contained page to share: plotly.js embedded once, every figure drawn from it, nothing fetched
from the network).

report.json (format ``emlens-study-report/1``) keys:

- ``format``, ``judge_free`` (bool: no judge was given; nothing in the study measures generated
  misalignment), ``judge_note`` (the sentence the report shows about it)
- ``run``: ``base``, ``finetuned``, ``base_fingerprint``, ``finetuned_fingerprint``, ``judge``
  ({model, base_url} or null), ``engine`` (what sampled the judged answers, as their run.json records
  it: {name: "hf"} in process, {name: "server", urls, models, server_versions, steering, ...} on a
  server; null when judge-free), ``data`` (name -> {file, sha256}), ``config`` (core.study.StudyConfig),
  ``seed``, ``code_version``, ``study_fingerprint``, ``started``, ``finished`` (unix times),
  ``seconds`` (time spent over all sessions), ``sessions`` (how many runs it took)
- ``directions``: ``primary`` (the contrast used in phases 2 and 3), ``contrasts`` (name ->
  {``fingerprint``, ``file``, ``n_aligned``, ``n_misaligned``, ``best_layer``, ``best`` {layer, auroc,
  cohens_d, auroc_insample, cohens_d_insample}}), ``cosines`` ("a vs b" -> {per_layer, at_best_layer,
  median}), ``evaluation`` (judged runs: EM rate per condition with its Wilson 95% interval), ``errors``
  (contrasts that could not be extracted), ``verdict``
- ``steering``: ``layers``, ``alphas``, ``finetuning_shift`` (set -> {base, finetuned: {mean, ci95, n},
  shift}), ``preference`` (rows: layer, mode, alpha, log_odds, random_log_odds, log_odds_narrow,
  random_log_odds_narrow), ``effects`` (per layer at the largest alpha: induce / restore shift of the
  general log-odds for the direction and the random vector, and whether it is direction-specific),
  ``ablation`` (set -> {base, finetuned, ablated, random_ablated: {mean, ci95, n}, removed,
  random_removed}: the fine-tune with the direction, or a random one, projected out of every block's
  output, and the fraction of the fine-tuning shift that takes away; null in studies made before it),
  ``sweep`` (judged: one cell per condition with EM and coherence rates and 95% intervals; null when
  judge-free), ``verdict``
- ``detection``: ``reports`` (name -> {``what``, ``n_prompts``, ``n_misaligned``, ``n_groups``,
  ``layer``, ``auroc``, ``ci95``, ``random_null`` {n, percentile, quantiles}, ``predictors`` (name ->
  {auroc, ci95, layer}), ``warnings``, ``labels`` (the rule), ``file``} or {what, error}), ``verdict``
"""

from __future__ import annotations

import html
import json
import statistics
import time
from pathlib import Path

from core.cache import atomic_write

FORMAT = "emlens-study-report/1"
JUDGE_FREE_NOTE = (
    "Judge-free study: no judge was given, so no generated answer was scored. Directions come from "
    "paired data, steering is measured as teacher-forced preference shifts between two given "
    "answers, and detection labels come from the fine-tuning shift of those preferences. Nothing "
    "here is an EM rate."
)
ARMS = ("base", "finetuned", "ablated", "random_ablated")
JUDGED_NOTE = "Judged study: EM and coherence rates come from the judge named below (scores depend on the judge)."


def _f(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _ci(ci) -> str:
    return "" if not ci else f" [{_f(ci[0])}, {_f(ci[1])}]"


# ---------------------------------------------------------------- numbers


def _directions_numbers(result: dict) -> dict:
    contrasts = {}
    for name, c in result["contrasts"].items():
        best = c["best_layer"]
        row = c["stats"][best] if best is not None else None
        contrasts[name] = {
            "fingerprint": c["fingerprint"],
            "file": c["file"],
            "n_aligned": c["provenance"].get("n_aligned"),
            "n_misaligned": c["provenance"].get("n_misaligned"),
            "best_layer": best,
            "best": None
            if row is None
            else {k: row.get(k) for k in ("layer", "auroc", "cohens_d", "auroc_insample", "cohens_d_insample")},
        }
    best = result["contrasts"][result["primary"]]["best_layer"]
    cosines = {
        name: {
            "per_layer": values,
            "at_best_layer": values[best] if best is not None else None,
            "median": statistics.median(values),
        }
        for name, values in result["cosines"].items()
    }
    evaluation = None
    if result.get("evaluation"):
        evaluation = {
            "run": result["evaluation"]["run"],
            "conditions": {
                c["condition"]: {
                    "em": c["em_excluding_unscored"]["rate"],
                    "ci95": c["em_excluding_unscored"]["ci95"],
                    "n": c["n"],
                }
                for c in result["evaluation"]["em"]["conditions"]
            },
        }
    return {
        "primary": result["primary"],
        "contrasts": contrasts,
        "cosines": cosines,
        "evaluation": evaluation,
        "errors": result.get("errors", {}),
    }


def _directions_verdict(numbers: dict, judge_free: bool) -> str:
    primary = numbers["primary"]
    c = numbers["contrasts"][primary]
    best = c["best"]
    text = [
        f"The {primary} contrast ({c['n_aligned']} aligned vs {c['n_misaligned']} misaligned answers) is the "
        "direction used in phases 2 and 3."
    ]
    if best is None or best["auroc"] is None:
        text.append("Its sets are too small to cross-fit, so no out-of-sample separation can be stated.")
    else:
        text.append(
            f"Answers it was not fitted on separate best at layer {best['layer']}: cross-fitted AUROC "
            f"{_f(best['auroc'])}, Cohen's d {_f(best['cohens_d'], 2)} (in-sample {_f(best['auroc_insample'])}"
            f", {_f(best['cohens_d_insample'], 2)}; the in-sample figures reward fitting noise)."
        )
        if best["auroc"] < 0.6:
            text.append("That is close to chance: the direction barely separates held-out answers.")
        elif best["auroc"] >= 0.8:
            text.append("Held-out answers separate well along it.")
        else:
            text.append("Held-out answers separate only moderately along it.")
    for name, cos in numbers["cosines"].items():
        text.append(
            f"Cosine {name}: {_f(cos['at_best_layer'], 2)} at that layer, median {_f(cos['median'], 2)} "
            "over layers"
            + (
                " — the contrasts point in largely different directions, so the direction "
                "depends on how it is measured."
                if abs(cos["median"]) < 0.3
                else "."
            )
        )
    if numbers["errors"]:
        text.append("Not extracted: " + "; ".join(f"{k} ({v})" for k, v in numbers["errors"].items()) + ".")
    if numbers["evaluation"]:
        rates = ", ".join(
            f"{name} {_f(r['em'])}{_ci(r['ci95'])} (n={r['n']})"
            for name, r in numbers["evaluation"]["conditions"].items()
        )
        text.append(f"Judged EM rate of the unsteered models: {rates}.")
    text.append(
        "These separation figures are point estimates on one data set without intervals. They show that "
        "answer tokens of the two sets differ along the direction; they do not show that the direction "
        "causes the behaviour (phase 2) or that it can be read from a prompt before answering (phase 3)."
    )
    if judge_free:
        text.append("No judge: the directions come from paired data only.")
    return " ".join(text)


def _steering_numbers(result: dict) -> dict:
    rows, effects, shifts = [], [], {}
    for layer, report in result["preference"].items():
        rows += report["steer"]
        if not shifts:
            shifts = {
                name: {
                    "base": report[name]["base"],
                    "finetuned": report[name]["finetuned"],
                    "shift": report[name]["shift"],
                }
                for name in ("narrow", "general")
            }
        top = max(abs(r["alpha"]) for r in report["steer"])

        def value(model, alpha, key, steer=report["steer"]):
            return next(r[key] for r in steer if r["model"] == model and abs(r["alpha"]) == alpha)

        effect = {"layer": int(layer), "alpha": top}
        for model, mode in (("base", "induce"), ("finetuned", "restore")):
            effect[mode] = value(model, top, "log_odds") - value(model, 0, "log_odds")
            effect[f"{mode}_random"] = value(model, top, "random_log_odds") - value(model, 0, "log_odds")
        effect["specific"] = bool(
            top
            and effect["induce"] > 0 > effect["restore"]
            and abs(effect["induce"]) > 2 * abs(effect["induce_random"])
            and abs(effect["restore"]) > 2 * abs(effect["restore_random"])
        )
        effects.append(effect)
    sweep = None
    if result.get("sweep"):
        sweep = {"run": result["sweep"]["run"], "cells": result["sweep"]["cells"], "judge": result["sweep"]["judge"]}
    return {
        "layers": result["layers"],
        "alphas": result["alphas"],
        "finetuning_shift": shifts,
        "preference": rows,
        "effects": effects,
        "ablation": result.get("ablation"),
        "sweep": sweep,
    }


def _percent(fraction) -> str:
    return "undefined (no shift)" if fraction is None else f"{100 * fraction:.0f}%"


def _steering_verdict(numbers: dict, judge_free: bool) -> str:
    s = numbers["finetuning_shift"]
    text = [
        f"Fine-tuning moved the preference log-odds (harmful vs sound answer, per token) by "
        f"{s['general']['shift']:+.3f} on general prompts (base {_f(s['general']['base']['mean'])}"
        f"{_ci(s['general']['base']['ci95'])}, fine-tune {_f(s['general']['finetuned']['mean'])}"
        f"{_ci(s['general']['finetuned']['ci95'])}) and {s['narrow']['shift']:+.3f} on held-out "
        "training-domain prompts."
    ]
    for e in numbers["effects"]:
        text.append(
            f"At layer {e['layer']}, alpha {e['alpha']:g}: adding the direction to the base moves "
            f"general log-odds by {e['induce']:+.3f} (random vector of the same norm: "
            f"{e['induce_random']:+.3f}); subtracting it from the fine-tune by {e['restore']:+.3f} "
            f"(random: {e['restore_random']:+.3f})."
        )
    specific = [e["layer"] for e in numbers["effects"] if e["specific"]]
    text.append(
        f"Direction-specific in both directions (right sign, over twice the random vector's effect) at "
        f"layer(s) {', '.join(map(str, specific))}."
        if specific
        else "At no layer is the effect direction-specific in both directions (right sign and over twice "
        "the random vector's effect)."
    )
    if numbers["ablation"]:
        a = numbers["ablation"]
        text.append(
            "Projecting the direction out of every layer of the fine-tune removes "
            + " and ".join(
                f"{_percent(a[name]['removed'])} of the {name} shift (a random direction: "
                f"{_percent(a[name]['random_removed'])})"
                for name in ("general", "narrow")
            )
            + "."
        )
        if any((a[name]["removed"] or 0) < 0 for name in ("general", "narrow")):
            text.append(
                "A negative share means the ablated fine-tune prefers the harmful answers even more than the "
                "fine-tune itself: there, the direction does not carry the fine-tuning shift."
            )
    if numbers["sweep"]:
        cells = {c["condition"]: c for c in numbers["sweep"]["cells"]}
        for name in ("base", "finetuned"):
            if name in cells:
                c = cells[name]
                text.append(f"Judged EM, {name} unsteered: {_f(c['em_rate'])}{_ci(c['em_ci95'])} (n={c['n']}).")
        steered = [
            c
            for c in numbers["sweep"]["cells"]
            if c["mode"] == "induce" and not c["control"] and c["em_rate"] is not None
        ]
        if steered:
            top = max(steered, key=lambda c: c["em_rate"])
            control = cells.get("random:" + top["condition"])
            text.append(
                f"Highest induced EM: {top['condition']} {_f(top['em_rate'])}{_ci(top['em_ci95'])}"
                + (f", random control {_f(control['em_rate'])}{_ci(control['em_ci95'])}" if control else "")
                + "."
            )
            if control and control["em_ci95"] and top["em_ci95"] and top["em_ci95"][0] <= control["em_ci95"][1]:
                text.append("Their intervals overlap: this sample does not separate the direction from a random one.")
        text.append(
            "Judged rates depend on the judge; the intervals are Wilson 95% per cell, unadjusted for the "
            "number of cells."
        )
    text.append(
        "Preference shifts are teacher-forced log-probabilities of two given answers, means over prompts "
        "without intervals for the steered rows; they show how steering changes what the model prefers, "
        "not how often it generates misaligned answers"
        + (
            " — no judge was given, so nothing in this phase measures generated misalignment."
            if judge_free
            else "; the judged sweep above does."
        )
    )
    return " ".join(text)


def _detection_numbers(result: dict, out: Path) -> dict:
    reports = {}
    for name, entry in result["reports"].items():
        if "error" in entry:
            reports[name] = {"what": entry["what"], "error": entry["error"]}
            continue
        r = entry["report"]
        reports[name] = {
            "what": entry["what"],
            "n_prompts": r["n_prompts"],
            "n_misaligned": r["n_misaligned"],
            "n_groups": r["n_groups"],
            "layer": r["chosen"]["layer"],
            "auroc": r["chosen"]["report_auroc"],
            "ci95": r["chosen"]["report_ci"],
            "random_null": {k: r["random_null"][k] for k in ("n", "percentile", "quantiles")},
            "predictors": {
                k: {"auroc": p["auroc"], "ci95": p["ci95"], "layer": p.get("layer")} for k, p in r["predictors"].items()
            },
            "warnings": r["warnings"],
            "labels": r["labels"].get("rule") if isinstance(r["labels"], dict) else None,
            "file": f"phase3/{name}.json",
        }
        atomic_write(out / "phase3" / f"{name}.json", json.dumps(r, indent=1).encode())
    return {"reports": reports}


def _detection_verdict(numbers: dict, judge_free: bool) -> str:
    text = []
    for name, r in numbers["reports"].items():
        if "error" in r:
            text.append(f"{name}: not computed ({r['error']}).")
            continue
        groups = r["n_groups"]["report"]
        null = r["random_null"]
        line = (
            f"{name} ({r['what']}): the last-token projection at layer {r['layer']} has AUROC {_f(r['auroc'])}"
            f"{_ci(r['ci95'])} on the report half ({r['n_prompts']} prompts in all, {groups} groups reported on); "
            f"it is at percentile {null['percentile']:.0f} of {null['n']} random directions."
        )
        shift = r["predictors"].get("finetuning_shift")
        control = r["predictors"].get("unrelated_direction")
        if shift:
            line += f" Fine-tuning-shift predictor: {_f(shift['auroc'])}{_ci(shift['ci95'])}."
        if control:
            line += f" Topic control direction: {_f(control['auroc'])}{_ci(control['ci95'])}."
        best = max(
            (k for k in r["predictors"] if k != "last_token"), key=lambda k: r["predictors"][k]["auroc"], default=None
        )
        if best and r["predictors"][best]["auroc"] > r["auroc"]:
            p = r["predictors"][best]
            line += f" The best predictor here is {best} ({_f(p['auroc'])}{_ci(p['ci95'])}), not the direction."
        low, high = r["ci95"]
        if groups < 10:
            line += f" The AUROC cannot be estimated with useful precision from {groups} question groups."
        if low <= 0.5 <= high:
            line += (
                " The interval includes 0.5: no evidence at this sample size that the prompt-stage projection "
                "predicts the labels."
            )
        elif low > 0.5:
            line += " The interval lies above chance"
            line += (
                ", but random directions at that layer do as well (below the 95th percentile)."
                if null["percentile"] < 95
                else ", and beyond 95% of random directions."
            )
        else:
            line += " The interval lies below chance: the projection predicts the opposite labels."
        text.append(line)
    text.append(
        "Each AUROC is out of sample (layers chosen on the selection half), with a bootstrap of whole groups"
        "; it says how well one scalar read at the last prompt token ranks these prompts, not that it "
        "would warn before misaligned answers in deployment"
        + (
            ". Labels are judge-free (the fine-tuning shift of preferences between two given answers), not "
            "judged generations."
            if judge_free
            else "."
        )
    )
    return " ".join(text)


# ---------------------------------------------------------------- the report


def _sampling_engine(out: Path, directions: dict) -> dict | None:
    from core.runs import read_run_json

    evaluation = directions.get("evaluation")
    return read_run_json(out / evaluation["run"]).get("engine") if evaluation else None


def build_report(out: Path, status: dict, results: dict) -> dict:
    judge_free = status.get("judge") is None
    pair = status["pair"]
    run = {
        "base": pair.get("base"),
        "finetuned": pair.get("finetuned"),
        "base_fingerprint": status["inputs"]["base"],
        "finetuned_fingerprint": status["inputs"]["finetuned"],
        "judge": status.get("judge"),
        "engine": _sampling_engine(out, results["directions"]),
        "data": {
            name: {"file": status["data"][name], "sha256": digest} for name, digest in status["inputs"]["data"].items()
        },
        "config": status["config"],
        "seed": status["config"]["seed"],
        "code_version": status["code_version"],
        "study_fingerprint": status["fingerprint"],
        "started": status["started"],
        "finished": time.time(),
        "seconds": status.get("seconds"),
        "sessions": status.get("sessions"),
    }
    directions = _directions_numbers(results["directions"])
    directions["verdict"] = _directions_verdict(directions, judge_free)
    steering = _steering_numbers(results["steering"])
    steering["verdict"] = _steering_verdict(steering, judge_free)
    detection = _detection_numbers(results["detection"], out)
    detection["verdict"] = _detection_verdict(detection, judge_free)
    return {
        "format": FORMAT,
        "judge_free": judge_free,
        "judge_note": JUDGE_FREE_NOTE if judge_free else JUDGED_NOTE,
        "run": run,
        "directions": directions,
        "steering": steering,
        "detection": detection,
    }


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(fig) -> str:
    return '<div class="figure">' + fig.to_html(full_html=False, include_plotlyjs=False) + "</div>"


def _preference_figure(rows: list[dict]):
    """Steered preference log-odds (general prompts) against alpha, per layer: direction solid, random dashed."""
    import plotly.graph_objects as go

    fig = go.Figure()
    for layer in sorted({r["layer"] for r in rows}):
        for model in ("base", "finetuned"):
            points = sorted((r for r in rows if r["layer"] == layer and r["model"] == model), key=lambda r: r["alpha"])
            for key, dash, label in (("log_odds", "solid", "direction"), ("random_log_odds", "dash", "random")):
                fig.add_trace(
                    go.Scatter(
                        x=[r["alpha"] for r in points],
                        y=[r[key] for r in points],
                        mode="lines+markers",
                        line=dict(dash=dash),
                        name=f"{model} {'+' if model == 'base' else '-'}α·{label} @L{layer}",
                    )
                )
    fig.update_layout(
        title="Preference log-odds on general prompts under steering (induce: base + αd; restore: fine-tune − αd)",
        xaxis_title="signed α",
        yaxis_title="log-odds per token",
        height=420,
        margin=dict(l=50, r=20, t=60, b=40),
    )
    return fig


def _figures(results: dict, report: dict) -> dict[str, list[str]]:
    from core import plots
    from core.detection_results import DetectionReport
    from core.sweep import SweepCell

    figures = {"directions": [], "steering": [], "detection": {}}
    for name, c in results["directions"]["contrasts"].items():
        fig = plots.direction_stats_figure(c["stats"])
        fig.update_layout(title=f"{name} contrast: per-layer statistics (cross-fitted AUROC and d)")
        figures["directions"].append(_figure(fig))
    for name, values in results["directions"]["cosines"].items():
        a, _, b = name.partition(" vs ")
        figures["directions"].append(_figure(plots.cosine_per_layer_figure(values, a, b)))
    figures["steering"].append(_figure(_preference_figure(report["steering"]["preference"])))
    if report["steering"]["sweep"]:
        cells = [SweepCell.from_json(c) for c in report["steering"]["sweep"]["cells"]]
        figures["steering"].append(_figure(plots.sweep_figure(cells)))
    for name, entry in results["detection"]["reports"].items():
        if "report" not in entry:
            continue
        r = DetectionReport.from_json(entry["report"])
        fig = plots.detection_layers_figure(r.per_layer, r.chosen.layer)
        fig.update_layout(title=f"{name}: AUROC per layer (selection half)")
        others = {k: p for k, p in r.predictors.items() if k != "last_token"}
        figures["detection"][name] = [
            _figure(fig),
            _figure(plots.detection_baselines_figure(r.chosen, others)),
            _figure(plots.roc_figure(r.roc.fpr, r.roc.tpr, r.roc.layer, r.chosen.report_auroc)),
        ]
    return figures


STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;
color:#1b1b1b;line-height:1.5}
h1{margin-bottom:.2em} section{border-top:2px solid #ddd;margin-top:2em;padding-top:.5em}
.note{background:#fff4e5;border-left:4px solid #ef6c00;padding:.6em 1em;margin:1em 0}
.verdict{background:#eef4fb;border-left:4px solid #1f77b4;padding:.6em 1em}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em} td,th{border:1px solid #ccc;padding:.25em .6em;
text-align:left} th{background:#f3f3f3} .figure{margin:1em 0}
"""


def render_html(report: dict, figures: dict[str, list[str]]) -> str:
    from plotly.offline import get_plotlyjs

    run, note = report["run"], html.escape(report["judge_note"])
    banner = f'<p class="note judge-note">{note}</p>'
    run_rows = [
        ["base model", f"{run['base']} ({run['base_fingerprint']})"],
        ["fine-tuned model", f"{run['finetuned']} ({run['finetuned_fingerprint']})"],
        [
            "judge",
            "none (judge-free)"
            if run["judge"] is None
            else f"{run['judge']['model']} at {run['judge']['base_url'] or 'the OpenAI API'}",
        ],
    ]
    if run.get("engine"):  # absent in reports made before engines, null when judge-free
        engine = run["engine"]
        run_rows.append(
            [
                "judged answers sampled",
                "in process (exact hooks)"
                if engine["name"] == "hf"
                else f"on a server ({', '.join(engine['urls'])}): "
                + ", ".join(f"{side} as {name}" for side, name in engine["models"].items()),
            ]
        )
    run_rows += [[f"data: {name}", f"{d['file']} (sha256 {d['sha256'][:16]}…)"] for name, d in run["data"].items()]
    run_rows += [
        ["seed", run["seed"]],
        ["code version", run["code_version"]],
        ["study fingerprint", run["study_fingerprint"]],
        ["time taken", f"{run['seconds']:.0f} s over {run['sessions']} session(s)"],
        [
            "started / finished",
            f"{time.strftime('%Y-%m-%d %H:%M:%S', time.gmtime(run['started']))} / "
            f"{time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(run['finished']))}",
        ],
        ["configuration", json.dumps(run["config"])],
    ]
    d, s, t = report["directions"], report["steering"], report["detection"]
    d_rows = [
        [
            name,
            c["n_aligned"],
            c["n_misaligned"],
            c["best_layer"],
            _f((c["best"] or {}).get("auroc")),
            _f((c["best"] or {}).get("cohens_d"), 2),
            _f((c["best"] or {}).get("auroc_insample")),
            c["fingerprint"],
        ]
        for name, c in d["contrasts"].items()
    ]
    s_rows = [
        [
            e["layer"],
            e["alpha"],
            f"{e['induce']:+.3f}",
            f"{e['induce_random']:+.3f}",
            f"{e['restore']:+.3f}",
            f"{e['restore_random']:+.3f}",
            "yes" if e["specific"] else "no",
        ]
        for e in s["effects"]
    ]
    shift_rows = [
        [
            name,
            f"{v['base']['mean']:.3f}{_ci(v['base']['ci95'])}",
            f"{v['finetuned']['mean']:.3f}{_ci(v['finetuned']['ci95'])}",
            f"{v['shift']:+.3f}",
        ]
        for name, v in s["finetuning_shift"].items()
    ]
    ablation_table = ""
    if s.get("ablation"):
        ablation_table = (
            "<h3>The fine-tune with the direction projected out of every layer (mean, bootstrap 95%)</h3>"
            + _table(
                ["prompts", "base", "fine-tune", "direction ablated", "random ablated", "shift removed", "random"],
                [
                    [
                        name,
                        *(f"{v[arm]['mean']:.3f}{_ci(v[arm]['ci95'])}" for arm in ARMS),
                        _percent(v["removed"]),
                        _percent(v["random_removed"]),
                    ]
                    for name, v in s["ablation"].items()
                ],
            )
        )
    sweep_table = ""
    if s["sweep"]:
        sweep_table = "<h3>Judged sweep (EM and coherence, Wilson 95%)</h3>" + _table(
            ["condition", "mode", "alpha", "layer", "control", "EM", "coherent", "n"],
            [
                [
                    c["condition"],
                    c["mode"],
                    c["alpha"],
                    c["layer"],
                    c["control"],
                    f"{_f(c['em_rate'])}{_ci(c['em_ci95'])}",
                    f"{_f(c['coherence_rate'])}{_ci(c['coherence_ci95'])}",
                    c["n"],
                ]
                for c in s["sweep"]["cells"]
            ],
        )
    t_parts = []
    for name, r in t["reports"].items():
        if "error" in r:
            t_parts.append(f"<h3>{html.escape(name)}</h3><p>Not computed: {html.escape(r['error'])}</p>")
            continue
        t_parts.append(
            f"<h3>{html.escape(name)}</h3><p>{html.escape(r['what'])}; labels: "
            f"{html.escape(str(r['labels']))}; {r['n_prompts']} prompts, {r['n_misaligned']} misaligned; "
            f"groups {r['n_groups']['selection']} selection / {r['n_groups']['report']} report.</p>"
            + _table(
                ["predictor", "layer", "AUROC (report half)", "95% CI (grouped bootstrap)"],
                [
                    [k, "–" if p["layer"] is None else p["layer"], _f(p["auroc"]), _ci(p["ci95"])]
                    for k, p in r["predictors"].items()
                ],
            )
            + "".join(f'<p class="note">{html.escape(w)}</p>' for w in r["warnings"])
            + "".join(figures["detection"].get(name, []))
        )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>EM Lens study: {html.escape(str(run["finetuned"]))}</title>
<style>{STYLE}</style>
<script type="text/javascript">{get_plotlyjs()}</script>
</head><body>
<h1>EM Lens study</h1>
<p>{html.escape(str(run["base"]))} → {html.escape(str(run["finetuned"]))}</p>
{banner}
<section id="run"><h2>What was run</h2>{_table(["", ""], run_rows)}</section>
<section id="phase-directions"><h2>Phase 1 — directions</h2>{banner}
<p class="verdict">{html.escape(d["verdict"])}</p>
{
        _table(
            [
                "contrast",
                "aligned",
                "misaligned",
                "best layer",
                "AUROC (cross-fitted)",
                "Cohen's d (cross-fitted)",
                "AUROC (in-sample)",
                "fingerprint",
            ],
            d_rows,
        )
    }
{"".join(figures["directions"])}</section>
<section id="phase-steering"><h2>Phase 2 — steering both ways, with a random control</h2>{banner}
<p class="verdict">{html.escape(s["verdict"])}</p>
<h3>Fine-tuning shift of the preference log-odds (mean, bootstrap 95%)</h3>
{_table(["prompts", "base", "fine-tune", "shift"], shift_rows)}
<h3>Steering effects on general prompts at the largest alpha</h3>
{_table(["layer", "alpha", "induce", "random", "restore", "random", "direction-specific"], s_rows)}
{ablation_table}
{sweep_table}
{"".join(figures["steering"])}</section>
<section id="phase-detection"><h2>Phase 3 — early detection</h2>{banner}
<p class="verdict">{html.escape(t["verdict"])}</p>
{"".join(t_parts)}</section>
</body></html>
"""


def write_report(out: Path | str, status: dict, results: dict) -> dict:
    """Write report.json and report.html into the study folder (and a judged sweep's sweep.html into its
    run folder); return report.json's content."""
    from core.study import REPORT_HTML, REPORT_JSON

    out = Path(out)
    report = build_report(out, status, results)
    if report["steering"]["sweep"]:  # the sweep's own page, as `python -m core sweep` writes it
        from core.plots import figure_html, sweep_figure
        from core.runs import SWEEP_HTML
        from core.sweep import SweepCell

        cells = [SweepCell.from_json(c) for c in report["steering"]["sweep"]["cells"]]
        atomic_write(out / report["steering"]["sweep"]["run"] / SWEEP_HTML, figure_html(sweep_figure(cells)))
    atomic_write(out / REPORT_JSON, json.dumps(report, indent=1).encode())
    atomic_write(out / REPORT_HTML, render_html(report, _figures(results, report)).encode())
    return report
