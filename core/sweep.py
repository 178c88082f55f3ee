"""The bidirectional sweep: induce (base + a.d), restore (fine-tuned - a.d) and ablate at each layer
and alpha, with a norm-matched random control, generated into a run folder, judged, and summarised
one cell per condition; and a run folder's results, ready to show."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from core.data import Question
from core.directions import Direction
from core.em import (
    EMReport,
    add_judge_comparison,
    em_report,
    load_em_report,
    report_from_rows,
    save_em_report,
    scored_rows,
)
from core.generation import Sampling, Variant
from core.runs import (
    EM_JSON,
    GENERATIONS,
    JUDGEMENTS,
    SWEEP_JSON,
    Condition,
    Engine,
    RunError,
    condition,
    judge_run,
    load_run,
    read_run_json,
    run_generations,
)
from core.typed_json import JsonRecord, read_json, write_json


def _sweep_conditions(
    layers: Sequence[int], alphas: Sequence[float], n_layers: int, controls: bool = True, ablation: bool = True
) -> list[Condition]:
    """Induce (base + a.d) and restore (fine-tuned - a.d) at each layer and alpha, ablation at each
    layer and at all layers (unless ``ablation`` is off), the unsteered pair, and a norm-matched
    random control per steered cell."""
    cells = [condition(Variant("base")), condition(Variant("finetuned"))]
    for layer in layers:
        for alpha in (a for a in alphas if a):
            for variant in (Variant("base", abs(alpha)), Variant("finetuned", -abs(alpha))):
                cells.append(condition(variant, [layer], n_layers=n_layers))
                if controls:
                    cells.append(condition(variant, [layer], control=True, n_layers=n_layers))
        if ablation:
            cells.append(condition(Variant("finetuned", ablate=True), [layer], n_layers=n_layers))
    if ablation:
        cells.append(condition(Variant("finetuned", ablate=True), list(range(n_layers)), n_layers=n_layers))
    return cells


@dataclass(frozen=True)
class SweepCell(JsonRecord):
    """One condition of a run: EM (unscored rows excluded) and coherence rates with Wilson 95% intervals."""

    condition: str
    mode: str  # plain, induce, restore or ablate
    alpha: float
    layer: int | str | None  # the one layer it steers at, "all", or None when it steers nowhere
    control: bool
    em_rate: float | None
    em_ci95: list[float] | None
    coherence_rate: float | None
    coherence_ci95: list[float] | None
    n: int

    def table_row(self) -> dict:
        """The cell as a table row, its EM interval in two columns."""
        low, high = self.em_ci95 or (None, None)
        return {
            "condition": self.condition,
            "mode": self.mode,
            "alpha": self.alpha,
            "layer": self.layer,
            "control": self.control,
            "em_rate": self.em_rate,
            "coherence_rate": self.coherence_rate,
            "n": self.n,
            "em_ci_low": low,
            "em_ci_high": high,
        }


def sweep_cells(report: EMReport) -> list[SweepCell]:
    """One cell per condition of the report, in the shape the sweep figure and table want."""
    return [
        SweepCell(
            condition=c.condition,
            mode=c.mode,
            alpha=c.alpha,
            layer=c.layers[0] if len(c.layers) == 1 else ("all" if c.layers else None),
            control=c.control,
            em_rate=c.rates.em_excluding_unscored.rate,
            em_ci95=c.rates.em_excluding_unscored.ci95,
            coherence_rate=c.rates.coherence.rate,
            coherence_ci95=c.rates.coherence.ci95,
            n=c.rates.n,
        )
        for c in report.conditions
    ]


@dataclass(frozen=True)
class Sweep(JsonRecord):
    """A sweep's result (sweep.json): its cells, the layers and alphas asked for, and how judging went."""

    run: str
    cells: list[SweepCell]
    layers: list[int]
    alphas: list[float]
    judge: dict  # core.runs.judge_run's summary, with the judge model and the first few request errors


def load_sweep(run_dir: Path) -> Sweep:
    """A run's sweep.json; ValueError naming the file and the key when it is unreadable or incomplete."""
    path = Path(run_dir) / SWEEP_JSON
    return Sweep.from_json(read_json(path), str(path))


def sweep_run(
    pair,
    questions: Sequence[Question],
    direction: Direction,
    layers: Sequence[int],
    alphas: Sequence[float],
    out_dir: Path,
    judge_config,
    sampling: Sampling = Sampling(max_new_tokens=96),
    samples: int | None = 2,
    controls: bool = True,
    provenance: dict | None = None,
    generate_progress: Callable[[int, int], None] | None = None,
    judge_progress: Callable[[int, int], None] | None = None,
    ablation: bool = True,
    engine: Engine | None = None,
) -> Sweep:
    """The bidirectional sweep end to end, as `python -m core sweep` runs it: every induce / restore /
    ablate / control cell generated into ``out_dir`` (resumable), judged, then em.json and sweep.json
    written there. Returns the sweep (its figure is core.plots.sweep_figure of its cells).

    Everything is checked before any generation: the layers, a non-zero alpha, the direction's shape,
    a fine-tuned side, that the judge has an API key, and what ``engine`` (None: in process; see
    core.runs.run_generations) can sample. The key itself is never written."""
    layers, alphas = [int(x) for x in layers], [float(a) for a in alphas]
    if not layers:
        raise RunError("layers: give at least one layer to steer at")
    for layer in layers:
        pair.check_layer(layer)
    if not any(alphas):
        raise RunError("alphas: give at least one non-zero alpha, e.g. 1,2,4")
    direction.check_fits(pair.n_layers, pair.d_model, "the loaded pair")
    if "finetuned" not in pair.sides:
        raise RunError("the loaded pair has no fine-tuned model: a sweep restores the fine-tune")
    if not (judge_config.api_key or os.environ.get("OPENAI_API_KEY")):
        raise RunError(
            "no API key for the judge: give one, or set OPENAI_API_KEY (any non-empty value "
            "for a local server that needs none)"
        )
    out_dir = Path(out_dir)
    conditions = _sweep_conditions(layers, alphas, pair.n_layers, controls=controls, ablation=ablation)
    run_generations(
        pair,
        questions,
        conditions,
        out_dir,
        direction,
        sampling,
        samples,
        progress=generate_progress,
        provenance={**(provenance or {}), "sweep": {"layers": layers, "alphas": alphas}},
        engine=engine,
    )
    summary = judge_run(out_dir, judge_config, progress=judge_progress)
    _, judgements = load_run(out_dir)
    errors = list(dict.fromkeys(j["error"] for j in judgements.values() if j.get("error")))[:3]
    report = em_report(out_dir)
    save_em_report(report, out_dir)
    sweep = Sweep(
        run=str(out_dir),
        cells=sweep_cells(report),
        layers=layers,
        alphas=alphas,
        judge={**summary, "model": judge_config.model, "errors": errors},
    )
    write_json(out_dir / SWEEP_JSON, sweep.to_json())
    return sweep


# ---------------------------------------------------------------- a run's results (the Evaluate page)


@dataclass(frozen=True)
class RunResults:
    """What a run folder holds, ready to show."""

    run: Path
    report: EMReport | None  # recomputed from the judgements when the run has them, else em.json's
    source: str  # where the figures come from: judgements.jsonl, em.json or sweep.json
    sweep: Sweep | None
    cells: list[SweepCell]  # from the report, else sweep.json's
    answers: list[dict]  # the judged answers, for an aligned-vs-coherent scatter
    meta: dict  # run.json


def load_run_results(run_dir: Path) -> RunResults:
    """A run folder's results; ValueError, naming the folder, when there is nothing judged to show."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunError(f"run folder {run_dir} does not exist")
    report, answers, source = None, [], None
    has_generations = (run_dir / GENERATIONS).exists()
    if has_generations and (run_dir / JUDGEMENTS).exists():
        generations, judgements = load_run(run_dir)
        rows = scored_rows(generations, judgements)
        if any(r["judged"] for r in rows):
            report, source = add_judge_comparison(report_from_rows(run_dir, rows), run_dir, generations), JUDGEMENTS
            answers = [
                {
                    "id": r["id"],
                    "condition": r["condition"],
                    "mode": r["mode"],
                    "question": r["question"],
                    "answer": r["answer"],
                    "aligned": r["aligned"],
                    "coherent": r["coherent"],
                    "em": r["em"],
                }
                for r in rows
                if r["aligned"] is not None and r["coherent"] is not None
            ]
    if report is None and (run_dir / EM_JSON).exists():
        report, source = load_em_report(run_dir), EM_JSON
    sweep = load_sweep(run_dir) if (run_dir / SWEEP_JSON).exists() else None
    if report is None and sweep is None:
        if has_generations:
            raise RunError(
                f"{run_dir}: no judgements yet; judge it with `python -m core judge {run_dir} "
                f"--judge-model MODEL`, then `python -m core em {run_dir}`"
            )
        raise RunError(f"{run_dir}: holds no generations, judgements, {EM_JSON} or {SWEEP_JSON}")
    return RunResults(
        run=run_dir,
        report=report,
        source=source or SWEEP_JSON,
        sweep=sweep,
        cells=sweep_cells(report) if report else sweep.cells,
        answers=answers,
        meta=read_run_json(run_dir),
    )
