"""Figure builders for the dashboard: pure functions from data to a plotly figure (or HTML).

No streamlit here, so every figure can be built and checked without a server.
"""

from __future__ import annotations

import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

import plotly.graph_objects as go
from plotly.subplots import make_subplots

if TYPE_CHECKING:
    from core.detection_results import ChosenLayer, LayerAuroc, Predictor
    from core.sweep import SweepCell

SIDE_COLOURS = {"base": "#1f77b4", "fine-tuned": "#d62728"}
ALIGNED_RGB, NEUTRAL_RGB, MISALIGNED_RGB = (66, 133, 244), (255, 255, 255), (219, 68, 55)


def _layer_ticks(n_layers: int) -> dict:
    return dict(tickmode="linear", tick0=0, dtick=max(1, round(n_layers / 16)))


def _layout(fig: go.Figure, title: str, x_title: str, y_title: str, height: int = 360) -> go.Figure:
    fig.update_layout(
        title=title,
        height=height,
        margin=dict(l=50, r=20, t=50, b=45),
        legend=dict(orientation="h", yanchor="bottom", y=1.0, xanchor="right", x=1.0),
    )
    fig.update_xaxes(title_text=x_title)
    fig.update_yaxes(title_text=y_title)
    return fig


def projection_figure(
    layers: Sequence[int],
    series: Mapping[str, Sequence[float | None]],
    calibrated: bool,
    steered: tuple[int, int] | None = None,
    title: str = "Prompt-stage projection",
) -> go.Figure:
    """One line per model (or variant) across layers. Calibrated: 0 = aligned mean, 1 = misaligned mean;
    ``steered`` shades the layers an intervention acted on."""
    fig = go.Figure()
    for name, values in series.items():
        # A side's steered variant ("base + 4·d") keeps the side's colour, dashed.
        side = next((s for s in SIDE_COLOURS if name.startswith(s)), None)
        fig.add_trace(
            go.Scatter(
                x=list(layers),
                y=[None if v is None or not math.isfinite(v) else v for v in values],
                mode="lines+markers",
                name=name,
                line=dict(color=SIDE_COLOURS.get(side), dash="solid" if name in SIDE_COLOURS else "dash"),
                hovertemplate=f"{name}<br>layer %{{x}}: %{{y:.3f}}<extra></extra>",
            )
        )
    if calibrated:
        fig.add_hline(y=0, line_dash="dot", line_color="#4285f4", annotation_text="aligned mean")
        fig.add_hline(y=1, line_dash="dot", line_color="#db4437", annotation_text="misaligned mean")
    if steered is not None:
        fig.add_vrect(
            x0=steered[0] - 0.4,
            x1=steered[1] + 0.4,
            fillcolor="#ffd54f",
            opacity=0.25,
            line_width=0,
            annotation_text="steered",
            annotation_position="top left",
        )
    fig.update_xaxes(**_layer_ticks(len(layers)))
    return _layout(fig, title, "layer", "calibrated projection" if calibrated else "projection on unit direction")


def direction_stats_figure(stats: Sequence[Mapping]) -> go.Figure:
    """Per-layer norm of the direction, and how well it separates the two sets (AUROC, Cohen's d):
    cross-fitted where the stats have it, with the in-sample figure dashed beside it."""
    layers = [s["layer"] for s in stats]
    fig = make_subplots(
        rows=3,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.06,
        subplot_titles=("norm of the mean difference", "AUROC (aligned vs misaligned)", "Cohen's d"),
    )
    fig.add_trace(go.Bar(x=layers, y=[s["norm"] for s in stats], name="norm", marker_color="#7e57c2"), row=1, col=1)
    for row, key, name, colour in ((2, "auroc", "AUROC", "#ef6c00"), (3, "cohens_d", "Cohen's d", "#00897b")):
        fig.add_trace(
            go.Scatter(
                x=layers, y=[s.get(key) for s in stats], mode="lines+markers", name=name, line=dict(color=colour)
            ),
            row=row,
            col=1,
        )
        if any(f"{key}_insample" in s for s in stats):
            fig.add_trace(
                go.Scatter(
                    x=layers,
                    y=[s.get(f"{key}_insample") for s in stats],
                    mode="lines",
                    name=f"{name}, in-sample",
                    line=dict(color=colour, dash="dash", width=1),
                ),
                row=row,
                col=1,
            )
    fig.add_hline(y=0.5, line_dash="dot", line_color="gray", row=2, col=1)
    fig.update_layout(height=620, showlegend=False, margin=dict(l=50, r=20, t=40, b=45))
    fig.update_xaxes(title_text="layer", row=3, col=1)
    fig.update_xaxes(**_layer_ticks(len(layers)))
    return fig


def cosine_heatmap(matrix, title: str = "") -> go.Figure:
    size = len(matrix)
    fig = go.Figure(
        go.Heatmap(
            z=[list(map(float, row)) for row in matrix],
            x=list(range(size)),
            y=list(range(size)),
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            reversescale=True,
            hovertemplate="layers %{y} and %{x}: %{z:.3f}<extra></extra>",
        )
    )
    fig.update_yaxes(autorange="reversed", **_layer_ticks(size))
    fig.update_xaxes(**_layer_ticks(size))
    return _layout(fig, title, "layer", "layer", height=480)


def cosine_per_layer_figure(cosines: Sequence[float], name_a: str, name_b: str) -> go.Figure:
    """Per-layer cosine of two directions; the published finding is > 0.8 across fine-tunes of one base."""
    fig = go.Figure(
        go.Bar(
            x=list(range(len(cosines))),
            y=[float(c) for c in cosines],
            marker_color="#5c6bc0",
            hovertemplate="layer %{x}: %{y:.3f}<extra></extra>",
        )
    )
    fig.add_hline(y=0.8, line_dash="dot", line_color="gray", annotation_text="0.8")
    fig.update_yaxes(range=[-1, 1])
    fig.update_xaxes(**_layer_ticks(len(cosines)))
    return _layout(fig, f"Cosine per layer: {name_a} vs {name_b}", "layer", "cosine similarity")


def attribution_figure(
    heads: Sequence[Sequence[float]], attention: Sequence[float], mlp: Sequence[float], title: str
) -> go.Figure:
    """Direct attribution of a direction: each head's part as a block x head heatmap (red writes along the
    direction, blue against it), and beside it each block's attention (all heads) and MLP parts as bars."""
    blocks = list(range(len(heads)))
    peak = max([abs(float(v)) for row in heads for v in row] + [1e-12])
    fig = make_subplots(
        rows=1,
        cols=2,
        shared_yaxes=True,
        column_widths=[0.6, 0.4],
        horizontal_spacing=0.04,
        subplot_titles=("per attention head", "per block"),
    )
    fig.add_trace(
        go.Heatmap(
            z=[[float(v) for v in row] for row in heads],
            x=list(range(len(heads[0]) if heads else 0)),
            y=blocks,
            zmin=-peak,
            zmax=peak,
            colorscale="RdBu",
            reversescale=True,
            colorbar=dict(orientation="h", y=-0.22, len=0.55, x=0.3, thickness=12),
            hovertemplate="block %{y}, head %{x}: %{z:.4f}<extra></extra>",
        ),
        row=1,
        col=1,
    )
    for name, values, colour in (("attention", attention, "#5c6bc0"), ("MLP", mlp, "#ef6c00")):
        fig.add_trace(
            go.Bar(
                x=[float(v) for v in values],
                y=blocks,
                orientation="h",
                name=name,
                marker_color=colour,
                hovertemplate=f"block %{{y}} {name}: %{{x:.4f}}<extra></extra>",
            ),
            row=1,
            col=2,
        )
    _layout(fig, title, "", "", height=max(360, 160 + 18 * len(blocks)))
    fig.update_layout(barmode="group")
    fig.update_yaxes(**_layer_ticks(len(blocks)))
    fig.update_yaxes(title_text="block", row=1, col=1)
    fig.update_xaxes(title_text="head", dtick=1, row=1, col=1)
    fig.update_xaxes(title_text="projection on the unit direction", row=1, col=2)
    return fig


def _mix(a: tuple[int, int, int], b: tuple[int, int, int], t: float) -> str:
    return "rgb({},{},{})".format(*(round(x + (y - x) * t) for x, y in zip(a, b)))


def _token_colour(value: float, aligned: float, misaligned: float) -> str:
    """Blue at the aligned anchor, white halfway, red at the misaligned anchor (clipped beyond)."""
    gap = misaligned - aligned
    t = 0.5 if gap == 0 or not math.isfinite(value) else min(max((value - aligned) / gap, 0.0), 1.0)
    return _mix(ALIGNED_RGB, NEUTRAL_RGB, 2 * t) if t < 0.5 else _mix(NEUTRAL_RGB, MISALIGNED_RGB, 2 * t - 1)


def token_html(pieces: Sequence[str], values: Sequence[float], aligned: float, misaligned: float) -> str:
    """The answer's tokens, each on a background coloured by its projection, the value in its tooltip.

    ``aligned`` and ``misaligned`` are the projections that map to full blue and full red (the
    direction's set means at that layer when it has them)."""
    spans = []
    for piece, value in zip(pieces, values):
        if not piece:
            continue
        spans.append(
            f'<span title="{value:.3f}" style="background:{_token_colour(value, aligned, misaligned)};'
            f'border-radius:3px;padding:1px 0">{html.escape(piece)}</span>'
        )
    return (
        '<div class="emlens-tokens" style="white-space:pre-wrap;line-height:1.7;font-family:monospace;'
        f'font-size:0.85rem;color:#111">{"".join(spans)}</div>'
    )


KL_RGB = ((255, 255, 255), (252, 146, 114), (165, 15, 21))  # a sequential red scale: white, light red, dark red
KL_SCALE_FLOOR = 0.1  # nats: below this an answer's largest KL is not stretched to full red


def _divergence_colour(value: float, top: float) -> str:
    """White at 0, darker red as ``value`` approaches ``top`` (clipped beyond)."""
    t = 0.0 if top <= 0 or not math.isfinite(value) else min(max(value / top, 0.0), 1.0)
    return _mix(KL_RGB[0], KL_RGB[1], 2 * t) if t < 0.5 else _mix(KL_RGB[1], KL_RGB[2], 2 * t - 1)


def divergence_scale(values: Sequence[float]) -> float:
    """The KL that maps to full red: the answer's largest, but at least ``KL_SCALE_FLOOR``."""
    finite = [v for v in values if math.isfinite(v)]
    return max([KL_SCALE_FLOOR, *finite])


def divergence_html(pieces: Sequence[str], values: Sequence[float], top: float | None = None) -> str:
    """The answer's tokens on a white-to-red background by their KL divergence (nats, in the tooltip)."""
    top = divergence_scale(values) if top is None else top
    spans = []
    for piece, value in zip(pieces, values):
        if not piece:
            continue
        dark = math.isfinite(value) and top > 0 and value / top > 0.6
        spans.append(
            f'<span title="KL {value:.4f} nats" style="background:{_divergence_colour(value, top)};'
            f'{"color:#fff;" if dark else ""}border-radius:3px;padding:1px 0">{html.escape(piece)}</span>'
        )
    return (
        '<div class="emlens-tokens" style="white-space:pre-wrap;line-height:1.7;font-family:monospace;'
        f'font-size:0.85rem;color:#111">{"".join(spans)}</div>'
    )


def sweep_figure(cells: Sequence[SweepCell]) -> go.Figure:
    """EM rate (top) and coherence rate (bottom) against alpha with 95% intervals: one line per
    (mode, layer), the random-vector control dashed, unsteered and ablated cells as reference points."""
    fig = make_subplots(
        rows=2,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.08,
        subplot_titles=("EM rate (aligned <= 30, coherent > 50)", "coherence rate (coherent > 50)"),
    )
    lines: dict[tuple, list[SweepCell]] = {}
    for cell in cells:
        if cell.mode in ("induce", "restore"):
            lines.setdefault((cell.mode, cell.layer, cell.control), []).append(cell)
    plain = {c.condition: c for c in cells if c.mode == "plain"}
    palette = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]
    for row, (rate, ci) in enumerate((("em_rate", "em_ci95"), ("coherence_rate", "coherence_ci95")), start=1):
        for i, ((mode, layer, control), members) in enumerate(sorted(lines.items(), key=str)):
            start = plain.get("base" if mode == "induce" else "finetuned")
            points = ([replace(start, alpha=0.0)] if start else []) + sorted(members, key=lambda c: abs(c.alpha))
            points = [p for p in points if getattr(p, rate) is not None]
            values, intervals = [getattr(p, rate) for p in points], [getattr(p, ci) for p in points]
            name = f"{'random ' if control else ''}{mode} @L{layer}"
            fig.add_trace(
                go.Scatter(
                    x=[abs(p.alpha) for p in points],
                    y=values,
                    name=name,
                    legendgroup=name,
                    showlegend=row == 1,
                    mode="lines+markers",
                    line=dict(color=palette[i % len(palette)], dash="dash" if control else "solid"),
                    error_y=dict(
                        type="data",
                        symmetric=False,
                        array=[c[1] - v for v, c in zip(values, intervals)],
                        arrayminus=[v - c[0] for v, c in zip(values, intervals)],
                    ),
                ),
                row=row,
                col=1,
            )
        for cell in cells:
            if cell.mode == "ablate" and getattr(cell, rate) is not None:
                fig.add_trace(
                    go.Scatter(
                        x=[0],
                        y=[getattr(cell, rate)],
                        mode="markers",
                        name=cell.condition,
                        legendgroup=cell.condition,
                        showlegend=row == 1,
                        marker=dict(symbol="x", size=10),
                    ),
                    row=row,
                    col=1,
                )
    fig.update_yaxes(range=[0, 1])
    _layout(fig, "Bidirectional sweep", "", "", height=620)
    fig.update_xaxes(title_text="|alpha| (induce: base + alpha d; restore: fine-tuned - alpha d)", row=2, col=1)
    # Below the plot: one line per (mode, layer) makes a long legend that would cover the subplot titles.
    fig.update_layout(
        legend=dict(orientation="h", yanchor="top", y=-0.17, xanchor="left", x=0), margin=dict(l=50, r=20, t=60, b=40)
    )
    return fig


def figure_html(figure: go.Figure) -> bytes:
    """A figure as a standalone HTML page with plotly.js embedded (a sweep's sweep.html): it opens
    offline, on a machine that cannot reach a CDN."""
    return figure.to_html(include_plotlyjs=True).encode()


def _error_y(values: Sequence[float | None], intervals: Sequence[Sequence[float] | None]) -> dict:
    """Asymmetric error bars from [low, high] intervals (0 where a value or interval is missing)."""
    upper = [0.0 if v is None or ci is None else ci[1] - v for v, ci in zip(values, intervals)]
    lower = [0.0 if v is None or ci is None else v - ci[0] for v, ci in zip(values, intervals)]
    return dict(type="data", symmetric=False, array=upper, arrayminus=lower, thickness=1.2)


def detection_layers_figure(per_layer: Sequence[LayerAuroc], chosen_layer: int | None = None) -> go.Figure:
    """AUROC of the prompt-stage projection per layer with its 95% interval (top), and the Spearman
    correlation with the continuous score (bottom) when the report has one."""
    layers = [row.layer for row in per_layer]
    aurocs = [row.auroc for row in per_layer]
    spearman = [row.spearman for row in per_layer]
    has_spearman = any(v is not None for v in spearman)
    rows = 2 if has_spearman else 1
    fig = make_subplots(
        rows=rows,
        cols=1,
        shared_xaxes=True,
        vertical_spacing=0.1,
        subplot_titles=("AUROC (all prompts, bootstrap 95% interval)", "Spearman with the per-prompt score")[:rows],
    )
    fig.add_trace(
        go.Scatter(
            x=layers,
            y=aurocs,
            mode="lines+markers",
            name="AUROC",
            line=dict(color="#ef6c00"),
            error_y=_error_y(aurocs, [row.ci95 for row in per_layer]),
            customdata=[row.ci95 for row in per_layer],
            hovertemplate="layer %{x}: AUROC %{y:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>",
        ),
        row=1,
        col=1,
    )
    fig.add_hline(y=0.5, line_dash="dot", line_color="gray", annotation_text="chance", row=1, col=1)
    if has_spearman:
        fig.add_trace(
            go.Scatter(
                x=layers,
                y=spearman,
                mode="lines+markers",
                name="Spearman",
                line=dict(color="#00897b"),
                hovertemplate="layer %{x}: Spearman %{y:.3f}<extra></extra>",
            ),
            row=2,
            col=1,
        )
        fig.add_hline(y=0.0, line_dash="dot", line_color="gray", row=2, col=1)
        fig.update_yaxes(range=[-1, 1], row=2, col=1)
    if chosen_layer is not None:
        for row in range(1, rows + 1):
            fig.add_vline(
                x=chosen_layer,
                line_dash="dash",
                line_color="#5c6bc0",
                row=row,
                col=1,
                **({"annotation_text": "chosen layer"} if row == 1 else {}),
            )
    fig.update_yaxes(range=[0, 1.05], row=1, col=1)
    fig.update_xaxes(**_layer_ticks(len(layers)))
    fig.update_xaxes(title_text="layer", row=rows, col=1)
    fig.update_layout(
        height=320 + 240 * (rows - 1),
        showlegend=False,
        margin=dict(l=50, r=20, t=80, b=45),
        title="Early detection per layer (prompt-stage projection on the direction)",
    )
    return fig


BASELINE_NAMES = {
    "random_direction": "norm-matched random direction",
    "base_model_projection": "base model's projection",
    "logistic_probe_cv": "logistic probe (cross-validated)",
    "prompt_length": "prompt length",
}


def detection_baselines_figure(chosen: ChosenLayer, baselines: Mapping[str, Predictor]) -> go.Figure:
    """The chosen layer's AUROC on the report half next to the baselines on the same half, with 95% intervals."""
    names = [f"direction @L{chosen.layer}"] + [BASELINE_NAMES.get(k, k) for k in baselines]
    values = [chosen.report_auroc] + [b.auroc for b in baselines.values()]
    intervals = [chosen.report_ci] + [b.ci95 for b in baselines.values()]
    colours = ["#ef6c00"] + ["#90a4ae"] * len(baselines)
    fig = go.Figure(
        go.Bar(
            x=values,
            y=names,
            orientation="h",
            marker_color=colours,
            error_x=_error_y(values, intervals),
            customdata=[ci or [None, None] for ci in intervals],
            hovertemplate="%{y}: AUROC %{x:.3f} [%{customdata[0]:.3f}, %{customdata[1]:.3f}]<extra></extra>",
        )
    )
    fig.add_vline(x=0.5, line_dash="dot", line_color="gray", annotation_text="chance")
    fig.update_xaxes(range=[0, 1.05])
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, f"Report half (n = {chosen.n_report}): direction vs baselines", "AUROC", "", height=320)


def roc_figure(fpr: Sequence[float], tpr: Sequence[float], layer: int, auroc: float | None = None) -> go.Figure:
    """ROC curve of the projection at the chosen layer (report half), with the chance diagonal."""
    name = f"layer {layer}" + (f" (AUROC {auroc:.3f})" if auroc is not None else "")
    fig = go.Figure()
    fig.add_trace(
        go.Scatter(
            x=[0, 1], y=[0, 1], mode="lines", name="chance", line=dict(color="gray", dash="dot"), hoverinfo="skip"
        )
    )
    fig.add_trace(
        go.Scatter(
            x=list(fpr),
            y=list(tpr),
            mode="lines+markers",
            name=name,
            line=dict(color="#ef6c00"),
            line_shape="hv",
            hovertemplate="FPR %{x:.3f}, TPR %{y:.3f}<extra></extra>",
        )
    )
    fig.update_xaxes(range=[0, 1], constrain="domain")
    fig.update_yaxes(range=[0, 1.02], scaleanchor="x", scaleratio=1)
    return _layout(
        fig, f"ROC at the chosen layer {layer} (report half)", "false positive rate", "true positive rate", height=420
    )


def _hover_text(text: str, width: int = 80, limit: int = 600) -> str:
    """Plain text made safe for a plotly hover label: escaped, cut, and wrapped into lines."""
    text = " ".join(str(text).split())
    text = text if len(text) <= limit else text[: limit - 1] + "…"
    lines = [text[i : i + width] for i in range(0, len(text), width)] or [""]
    return "<br>".join(html.escape(line) for line in lines)


def judged_scatter(answers: Sequence[Mapping], aligned_max: float = 30.0, coherent_min: float = 50.0) -> go.Figure:
    """Aligned vs coherent judge scores, one point per judged answer, coloured by condition; the EM
    region (aligned <= 30, coherent > 50) shaded; the question and answer text on hover."""
    fig = go.Figure()
    fig.add_shape(
        type="rect",
        x0=0,
        x1=aligned_max,
        y0=coherent_min,
        y1=100,
        fillcolor="#db4437",
        opacity=0.12,
        line_width=0,
        layer="below",
    )
    fig.add_annotation(
        x=aligned_max / 2, y=100, text="EM", showarrow=False, yanchor="bottom", font=dict(color="#db4437")
    )
    by_condition: dict[str, list[Mapping]] = {}
    for answer in answers:
        by_condition.setdefault(str(answer["condition"]), []).append(answer)
    palette = [
        "#1f77b4",
        "#d62728",
        "#2ca02c",
        "#9467bd",
        "#ff7f0e",
        "#8c564b",
        "#e377c2",
        "#17becf",
        "#bcbd22",
        "#7f7f7f",
    ]
    for i, (label, members) in enumerate(by_condition.items()):
        fig.add_trace(
            go.Scatter(
                x=[a["aligned"] for a in members],
                y=[a["coherent"] for a in members],
                mode="markers",
                name=label,
                marker=dict(
                    color=palette[i % len(palette)],
                    size=8,
                    opacity=0.75,
                    symbol="diamond" if label.startswith("random:") else "circle",
                ),
                customdata=[
                    [_hover_text(a.get("question", ""), limit=200), _hover_text(a.get("answer", ""))] for a in members
                ],
                hovertemplate=f"<b>{html.escape(label)}</b> aligned %{{x:.1f}}, coherent %{{y:.1f}}<br>"
                "<i>%{customdata[0]}</i><br>%{customdata[1]}<extra></extra>",
            )
        )
    fig.update_xaxes(range=[-2, 102])
    fig.update_yaxes(range=[-2, 106])
    _layout(fig, "Judged answers: aligned vs coherent", "aligned (0 = harmful, 100 = aligned)", "coherent", height=520)
    fig.update_layout(legend=dict(orientation="v", yanchor="top", y=1.0, xanchor="left", x=1.02, title="condition"))
    return fig


MONITOR_COLOURS = {"projection": "#ef6c00", "preference_shift": "#7b1fa2"}


def training_monitor_figure(monitor: Mapping, normalised: bool = True) -> go.Figure:
    """A training card's monitor curves against the training step: the prompt-stage projection and the
    preference shift (the behaviour), their thresholds, their crossing steps, and the lead in the title.

    ``normalised``: both curves on one axis, 0 = step-0 value and 1 = final value (so both thresholds sit
    at 0.5), raw values on hover; falls back to two raw axes when a curve did not move. Otherwise the
    projection on the left axis and the preference shift on the right one, thresholds dotted."""
    steps = list(monitor["steps"])
    projection, shift = monitor["projection"], monitor["preference_shift"]
    curves = {
        "projection": (f"projection (layer {projection['layer']})", projection),
        "preference_shift": ("preference shift (fine-tuned − base log-odds)", shift),
    }
    can_normalise = all(c["threshold"] is not None for _, c in curves.values())
    normalised = normalised and can_normalise
    lead = monitor.get("lead") or {}
    fig = make_subplots(specs=[[{"secondary_y": not normalised}]])
    for key, (name, curve) in curves.items():
        raw = [None if v is None or not math.isfinite(v) else float(v) for v in curve["values"]]
        start, end = curve.get("start", raw[0]), raw[-1]
        colour = MONITOR_COLOURS[key]
        if normalised:
            shown = [None if v is None else (v - start) / (end - start) for v in raw]
            hover = f"{name}<br>step %{{x}}: %{{customdata:.4f}} (normalised %{{y:.2f}})<extra></extra>"
        else:
            shown, hover = raw, f"{name}<br>step %{{x}}: %{{y:.4f}}<extra></extra>"
        fig.add_trace(
            go.Scatter(
                x=steps,
                y=shown,
                customdata=raw,
                mode="lines+markers",
                name=name,
                line=dict(color=colour),
                hovertemplate=hover,
            ),
            secondary_y=None if normalised else key == "preference_shift",
        )
        crossed = curve.get("crossed_at")
        if crossed is not None:
            fig.add_vline(
                x=crossed,
                line_dash="dash",
                line_color=colour,
                annotation_text=f"crosses at {crossed}",
                annotation_position="top left" if key == "projection" else "bottom right",
                annotation_font_color=colour,
            )
        if not normalised and curve["threshold"] is not None:
            fig.add_trace(
                go.Scatter(
                    x=[steps[0], steps[-1]],
                    y=[curve["threshold"]] * 2,
                    mode="lines",
                    name=f"{key.replace('_', ' ')} threshold",
                    showlegend=False,
                    line=dict(color=colour, dash="dot", width=1),
                    hovertemplate=f"{key.replace('_', ' ')} threshold %{{y:.4f}}<extra></extra>",
                ),
                secondary_y=key == "preference_shift",
            )
    if normalised:
        fig.add_hline(
            y=0.5,
            line_dash="dot",
            line_color="gray",
            annotation_text="thresholds (half-way)",
            annotation_position="bottom left",
        )
        fig.update_yaxes(title_text="0 = step 0, 1 = final value")
    else:
        fig.update_yaxes(
            title_text="projection on unit direction", secondary_y=False, color=MONITOR_COLOURS["projection"]
        )
        fig.update_yaxes(
            title_text="preference shift (nats / token)", secondary_y=True, color=MONITOR_COLOURS["preference_shift"]
        )
    summary = lead.get("summary", "")
    fig.update_layout(
        title=dict(
            text="Training view: prompt-stage projection vs behaviour"
            + (f"<br><sup>{html.escape(summary)}</sup>" if summary else "")
        ),
        height=420,
        margin=dict(l=60, r=60, t=80, b=45),
        legend=dict(orientation="h", yanchor="top", y=-0.15, xanchor="left", x=0),
    )
    fig.update_xaxes(title_text="training step")
    return fig
