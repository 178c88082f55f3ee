"""Early detection: do prompt-stage scores predict a label made from the answers?

Every split, fold and bootstrap is over whole groups (a question with its paraphrases and
samples); layers are chosen on one set of groups and every figure is reported on another, next
to baseline predictors and a null of random directions. The report it builds, and its file,
are in core.detection_results.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from core.chat import encode_prompt
from core.detection_results import (
    ChosenLayer,
    DetectionError,
    DetectionReport,
    GroupCounts,
    LayerAuroc,
    Predictor,
    PromptRisk,
    RandomNull,
    Roc,
)
from core.directions import Direction, Example, extract_contrast
from core.projections import last_token_activations, project, prompt_stage_activations
from core.stats import (
    auroc,
    auroc_ci,
    choose_layer_and_report,
    fit_probe,
    grouped_split,
    percentile_in,
    roc_curve,
    spearman,
)

MIN_GROUPS = 10  # below this many groups in a half, an AUROC's interval spans most of [0, 1]


# ---------------------------------------------------------------- labels


def _record_group(record) -> str:
    """A paired record's group: its ``group`` key, else its ``theme`` (the shipped general prompts ask
    about one theme in several wordings), else its own id (each finance question is distinct)."""
    return str(record.extra.get("group") or record.extra.get("theme") or record.id)


def _answer_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def answer_length_gap(tokenizer, record) -> int:
    """Harmful minus sound answer length in tokens (the harmful answer is often the shorter one)."""
    return _answer_tokens(tokenizer, record.misaligned) - _answer_tokens(tokenizer, record.aligned)


def length_matched(tokenizer, records, max_gap: int) -> tuple[list, dict]:
    """Keep the pairs whose harmful and sound answers differ by at most ``max_gap`` tokens."""
    kept = [r for r in records if abs(answer_length_gap(tokenizer, r)) <= max_gap]
    if not kept:
        raise DetectionError(f"no pair has answers within {max_gap} tokens of each other: raise --max-length-gap")
    return kept, {"max_gap_tokens": int(max_gap), "kept": len(kept), "dropped": len(records) - len(kept)}


def _pass_progress(progress, index: int):
    """Progress of pass ``index`` of two equal passes, reported as one bar."""
    return None if progress is None else (lambda done, total: progress(index * total + done, 2 * total))


def labels_from_preference(
    pair,
    records,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    max_length_gap: int | None = None,
) -> tuple[list[dict], dict]:
    """Judge-free labels from the fine-tuning shift of each pair's preference.

    Shift = fine-tuned minus base per-token log-odds of the harmful over the sound answer
    (:func:`core.preference.log_odds`): misaligned = the fine-tune moved toward the harmful answer
    (shift > 0; the median when that leaves a class empty). The absolute log-odds are dominated by
    what the base already prefers and by the answers' lengths, so those two are kept as baseline
    predictors. Returns the prompts and a description of the labels."""
    from core.preference import log_odds

    matched = None
    if max_length_gap is not None:
        records, matched = length_matched(pair.tokenizer, records, max_length_gap)
    finetuned = log_odds(pair, "finetuned", records, batch_size, _pass_progress(progress, 0))
    base = log_odds(pair, "base", records, batch_size, _pass_progress(progress, 1))
    shift = finetuned - base
    rule, labels = "fine-tuning shift > 0", shift > 0
    if labels.all() or not labels.any():
        rule, labels = "fine-tuning shift above its median", shift > np.median(shift)
    prompts = [
        {
            "id": r.id,
            "messages": r.messages,
            "group": _record_group(r),
            "score": float(v),
            "misaligned": bool(b),
            "baselines": {"base_log_odds": float(lo), "answer_length_gap": float(answer_length_gap(pair.tokenizer, r))},
            "answers": [{"answer": r.misaligned, "kind": "harmful"}, {"answer": r.aligned, "kind": "sound"}],
        }
        for r, v, b, lo in zip(records, shift, labels, base)
    ]
    return prompts, {
        "rule": rule,
        "length_matched": matched,
        "score": "fine-tuning shift: fine-tuned minus base per-token log-odds of the harmful "
        "over the sound answer, teacher-forced",
        "groups": "the record's group, else its theme, else its id",
    }


def labels_from_run(run_dir, rule: str = "any") -> list[dict]:
    """Per prompt of an evaluation run: EM rate of its judged fine-tuned samples, a binary label, and
    the question id as its group (all paraphrases and samples of a question form one group)."""
    from core.em import scored_rows
    from core.runs import load_run

    if rule not in ("any", "majority"):
        raise DetectionError(f"label rule {rule!r}: expected any or majority")
    generations, judgements = load_run(run_dir)
    grouped: dict[tuple, list[dict]] = {}
    for r in scored_rows(generations, judgements):
        if r["condition"] == "finetuned" and r["em"] is not None:
            grouped.setdefault((r["question_id"], r["paraphrase"]), []).append(r)
    if not grouped:
        raise DetectionError(f"{run_dir}: no judged samples of the unsteered fine-tuned model")
    prompts = []
    for (qid, paraphrase), rows in grouped.items():
        rate = sum(r["em"] for r in rows) / len(rows)
        prompts.append(
            {
                "id": f"{qid}/{paraphrase}",
                "messages": rows[0]["messages"],
                "group": str(qid),
                "score": rate,
                "misaligned": rate > 0 if rule == "any" else rate > 0.5,
                "answers": [{"answer": r["answer"], "aligned": r["aligned"], "coherent": r["coherent"]} for r in rows],
            }
        )
    return prompts


def labelled_prompts(
    pair,
    source,
    label_rule: str = "any",
    split: str = "all",
    max_length_gap: int | None = None,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[dict], dict]:
    """Prompts with labels and groups from a judged run folder or a paired JSONL file, and how they were made."""
    from core.data import load_paired_jsonl

    source = Path(source)
    if source.is_dir():
        return labels_from_run(source, label_rule), {
            "source": str(source),
            "rule": f"{label_rule} judged sample(s) EM",
            "score": "EM rate of the fine-tune's judged samples",
            "groups": "question id",
        }
    if not str(source).strip() or not source.is_file():
        raise DetectionError(
            f"paired file {str(source)!r}: no such file (a paired JSONL: id, messages, aligned, "
            "misaligned) or run folder"
        )
    records = load_paired_jsonl(source, None if split == "all" else split)
    prompts, info = labels_from_preference(pair, records, batch_size, progress, max_length_gap)
    return prompts, {"source": str(source), "split": split, **info}


# ---------------------------------------------------------------- the specificity control


def topic_control(pair, topic_a, topic_b, batch_size: int = 8) -> Direction:
    """A direction built like the paired one from two sets that differ in topic, not in alignment:
    the sound answers of paired file ``topic_b`` minus the sound answers of paired file ``topic_a``
    (each ``path`` or ``path:split``), teacher-forced through the fine-tune."""
    from core.data import load_paired_jsonl

    def sound(spec) -> list[Example]:
        path, _, split = str(spec).partition(":")
        return [
            Example(r.messages, r.aligned) for r in load_paired_jsonl(path, split if split not in ("", "all") else None)
        ]

    control = extract_contrast(pair, sound(topic_a), sound(topic_b), "topic-control", batch_size=batch_size)
    control.provenance.update({"topic_a": str(topic_a), "topic_b": str(topic_b)})
    return control


def default_control_topics(direction: Direction, source) -> tuple[str, str] | None:
    """For a paired source and a direction extracted from another paired file: (the source, the
    direction's own file and split), so the control contrasts the two topics' sound answers."""
    dataset, split = direction.provenance.get("dataset"), direction.provenance.get("split", "all")
    if not dataset or not Path(dataset).is_file() or not Path(source).is_file():
        return None
    if Path(dataset).resolve() == Path(source).resolve():
        return None
    return str(source), f"{dataset}:{split}"


# ---------------------------------------------------------------- early-detection statistics

PREDICTORS = {
    "last_token": "projection on the direction at the last prompt token (fine-tune)",
    "prompt_mean": "mean projection over the prompt text's tokens (fine-tune)",
    "prompt_max": "max projection over the prompt text's tokens (fine-tune)",
    "finetuning_shift": "fine-tuned minus base projection at the last prompt token",
    "base_last_token": "the base model's projection at the last prompt token",
    "probe": "logistic probe on the fine-tune's last-token activations at last_token's layer, fitted on the "
    "selection set (strength by grouped cross-validation)",
    "unrelated_direction": "specificity control: a direction built the same way from two topics",
    "prompt_length": "prompt length in tokens",
    "base_log_odds": "the base model's own preference log-odds",
    "answer_length_gap": "harmful minus sound answer length in tokens",
}

PROTOCOL = (
    "Groups (a question with its paraphrases and samples) are never split: the layer of each layered "
    "predictor, the probe and the orientation of scalar baselines are chosen on the selection groups; "
    "every AUROC is reported on the other groups with a 95% interval from a bootstrap of whole groups; "
    "the per-layer curve is the selection set's, its intervals unadjusted for the number of layers; "
    "random_null: the last_token AUROC's percentile among random directions at its layer"
)


def _report_auroc(
    scores: np.ndarray, y: np.ndarray, report: np.ndarray, groups: np.ndarray, n_boot: int, seed: int
) -> dict:
    return {
        "auroc": auroc(scores[report], y[report]),
        "ci95": list(auroc_ci(scores[report], y[report], groups[report], n_boot, seed=seed)),
    }


def _layered(name: str, scores: np.ndarray, y, select, report, groups, n_boot: int, seed: int) -> Predictor:
    """A per-layer score ``[n, n_layers]``: layer chosen on the selection set, AUROC on the report set."""
    chosen = choose_layer_and_report(scores.T, y, select, report, groups, n_boot, seed=seed)
    return Predictor(
        auroc=chosen["report_auroc"],
        ci95=chosen["report_ci"],
        layer=chosen["layer"],
        selection_auroc=chosen["selection_auroc"],
        orientation="higher = misaligned",
        what=PREDICTORS[name],
    )


def _oriented(name: str, values: np.ndarray, y, select, report, groups, n_boot: int, seed: int) -> Predictor:
    """A scalar baseline with no natural sign: oriented on the selection set, reported on the report set."""
    selection = auroc(values[select], y[select])
    sign = 1.0 if selection >= 0.5 else -1.0
    orientation = "higher = misaligned" if sign > 0 else "lower = misaligned (chosen on the selection set)"
    return Predictor(
        **_report_auroc(sign * values, y, report, groups, n_boot, seed),
        selection_auroc=max(selection, 1.0 - selection),
        orientation=orientation,
        what=PREDICTORS[name],
    )


def _probe(activations: np.ndarray, y, select, report, groups, n_boot: int, seed: int) -> Predictor:
    model = fit_probe(activations[select], y[select], groups[select], seed=seed)
    scores = np.zeros(len(y))
    scores[report] = model.predict_proba(activations[report])[:, 1]
    return Predictor(
        **_report_auroc(scores, y, report, groups, n_boot, seed), orientation="P(misaligned)", what=PREDICTORS["probe"]
    )


def _random_null(activations: np.ndarray, y, report, observed: float, n_random: int, seed: int) -> RandomNull:
    """AUROCs on the report set of isotropic random directions at one layer, and where ``observed`` falls."""
    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((n_random, activations.shape[1]))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    scores = activations[report] @ directions.T
    null = np.array([auroc(scores[:, k], y[report]) for k in range(n_random)])
    return RandomNull(
        n=int(n_random),
        percentile=percentile_in(observed, null),
        quantiles={q: float(np.quantile(null, float(q) / 100)) for q in ("2.5", "50", "97.5")},
        method="isotropic Gaussian directions at last_token's layer, fine-tune's last-token "
        "activations, report set (a projection on the unit vector does not depend on the "
        "norm, so every draw is norm-matched)",
    )


def _selection_curve(projection: np.ndarray, y, continuous, select, groups, n_boot: int, seed: int) -> list[LayerAuroc]:
    """Per layer on the selection set: AUROC with its grouped bootstrap interval (unadjusted), Spearman."""
    rows = []
    for layer in range(projection.shape[1]):
        scores = projection[select, layer]
        rows.append(
            LayerAuroc(
                layer=layer,
                auroc=auroc(scores, y[select]),
                ci95=list(auroc_ci(scores, y[select], groups[select], n_boot, seed=seed)),
                spearman=None if continuous is None else spearman(scores, continuous[select]),
            )
        )
    return rows


def _split(y, groups, n_select: int | None, heldout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Grouped selection / report split; in transfer mode the first ``n_select`` prompts are the selection set."""
    if n_select is None:
        return grouped_split(y, groups, heldout_fraction, seed)
    select, report = np.arange(n_select), np.arange(n_select, len(y))
    for name, part in (("selection", select), ("report", report)):
        if y[part].all() or not y[part].any():
            raise DetectionError(
                f"the {name} prompts are all labelled {'misaligned' if y[part].any() else 'aligned'}: "
                "detection needs both classes in each set"
            )
    return select, report


def _precision_warnings(n_groups: dict) -> list[str]:
    return [
        f"only {n} groups in the {half} set (fewer than {MIN_GROUPS}): the AUROC cannot be estimated "
        "with useful precision"
        for half, n in n_groups.items()
        if n < MIN_GROUPS
    ]


def _layered_scores(
    pair, messages, direction: Direction, control: Direction | None, batch_size: int, progress
) -> tuple[dict[str, np.ndarray], torch.Tensor]:
    """``{predictor: [n, n_layers]}`` for every per-layer predictor, and the fine-tune's last-token activations."""
    finetuned, token_mean, token_max = prompt_stage_activations(
        pair, "finetuned", messages, direction, batch_size, progress
    )
    last = project(finetuned, direction)
    base = project(last_token_activations(pair, "base", messages, batch_size), direction)
    scores = {
        "last_token": last,
        "prompt_mean": token_mean,
        "prompt_max": token_max,
        "finetuning_shift": last - base,
        "base_last_token": base,
    }
    if control is not None:
        scores["unrelated_direction"] = project(finetuned, control)
    return scores, finetuned


def _scalar_scores(pair, prompts: Sequence[dict]) -> dict[str, np.ndarray]:
    """Prompt length, and the per-prompt baselines every prompt carries (e.g. base log-odds)."""
    scores = {
        "prompt_length": np.array([len(encode_prompt(pair.tokenizer, p["messages"])) for p in prompts], dtype=float)
    }
    for name in sorted(set.intersection(*(set(p.get("baselines", {})) for p in prompts))):
        scores[name] = np.array([p["baselines"][name] for p in prompts], dtype=float)
    return scores


def _prompt_table(
    prompts: Sequence[dict], y, groups, report, continuous, risk: np.ndarray, calibrated: np.ndarray | None
) -> list[PromptRisk]:
    """One row per prompt, riskiest first: its label, score, risk at the chosen layer and set."""
    in_report = np.isin(np.arange(len(y)), report)
    table = [
        PromptRisk(
            id=p["id"],
            group=str(groups[i]),
            prompt=p["messages"][-1]["content"],
            misaligned=bool(y[i]),
            score=None if continuous is None else float(continuous[i]),
            risk=float(risk[i]),
            risk_calibrated=None if calibrated is None else float(calibrated[i]),
            split="report" if in_report[i] else "selection",
            answers=p.get("answers", []),
        )
        for i, p in enumerate(prompts)
    ]
    return sorted(table, key=lambda r: r.risk, reverse=True)


def detection_report(
    pair,
    prompts: Sequence[dict],
    direction: Direction,
    heldout_fraction: float = 0.5,
    seed: int = 0,
    n_boot: int = 1000,
    batch_size: int = 16,
    progress: Callable[[int, int], None] | None = None,
    select_prompts: Sequence[dict] | None = None,
    control: Direction | None = None,
    n_random: int = 100,
) -> DetectionReport:
    """Does a prompt-stage score predict misalignment before any token is generated?

    ``prompts``: dicts with ``id``, ``messages``, the binary label ``misaligned``, an optional ``group`` (default:
    its own id), an optional continuous ``score`` and optional scalar ``baselines``. Without
    ``select_prompts`` they are split by group into a selection and a report set; with them
    (transfer), every choice is made on ``select_prompts`` and every figure reported on ``prompts``.
    The report's ``labels`` (how the prompts were labelled) are left for the caller to fill.
    """
    if n_random < 50:
        raise DetectionError(f"the random-direction null needs at least 50 draws, got {n_random}")
    direction.check_fits(pair.n_layers, pair.d_model)
    if control is not None:
        control.check_fits(pair.n_layers, pair.d_model, "the loaded pair (control direction)")
    transfer = select_prompts is not None
    everything = [*(select_prompts or []), *prompts]
    y = np.array([bool(p["misaligned"]) for p in everything])
    if y.all() or not y.any():
        raise DetectionError(
            f"detection needs both classes; all {len(y)} prompts are labelled {'misaligned' if y.all() else 'aligned'}"
        )
    n_select = len(select_prompts) if transfer else None
    groups = [str(p.get("group", p["id"])) for p in everything]
    if transfer:  # a group never spans the two families, even where their names coincide
        groups = [("select:" if i < n_select else "report:") + g for i, g in enumerate(groups)]
    groups = np.array(groups)
    select, report = _split(y, groups, n_select, heldout_fraction, seed)
    continuous = (
        np.array([p["score"] for p in everything], dtype=float)
        if all(p.get("score") is not None for p in everything)
        else None
    )

    layered, finetuned = _layered_scores(
        pair, [p["messages"] for p in everything], direction, control, batch_size, progress
    )
    split = (y, select, report, groups, n_boot, seed)
    predictors = {name: _layered(name, scores, *split) for name, scores in layered.items()}
    layer = predictors["last_token"].layer
    activations = finetuned[:, layer].numpy().astype(np.float64)
    predictors["probe"] = _probe(activations, *split)
    predictors.update(
        {name: _oriented(name, values, *split) for name, values in _scalar_scores(pair, everything).items()}
    )

    chosen, last = predictors["last_token"], layered["last_token"]
    n_groups = {"selection": len(set(groups[select])), "report": len(set(groups[report]))}
    fpr, tpr, _ = roc_curve(last[report, layer], y[report])
    calibrated = direction.calibrate(last)
    return DetectionReport(
        split_unit="group",
        n_prompts=len(y),
        n_misaligned=int(y.sum()),
        n_groups=GroupCounts(**n_groups),
        warnings=_precision_warnings(n_groups),
        per_layer=_selection_curve(last, y, continuous, select, groups, n_boot, seed),
        per_layer_set="selection",
        per_layer_ci="grouped bootstrap 95%, unadjusted for the number of layers",
        chosen=ChosenLayer(
            layer=layer,
            selection_auroc=chosen.selection_auroc,
            report_auroc=chosen.auroc,
            report_ci=chosen.ci95,
            n_select=int(select.size),
            n_report=int(report.size),
        ),
        predictors=predictors,
        random_null=_random_null(activations, y, report, chosen.auroc, n_random, seed),
        roc=Roc(fpr=fpr.tolist(), tpr=tpr.tolist(), layer=layer),
        prompts=_prompt_table(
            everything,
            y,
            groups,
            report,
            continuous,
            last[:, layer],
            None if calibrated is None else calibrated[:, layer],
        ),
        direction=direction.provenance,
        protocol=PROTOCOL,
        control=control.provenance if control is not None else None,
        transfer={"n_select": int(select.size), "n_report": int(report.size)} if transfer else None,
        labels={},
    )


def detect(
    pair,
    direction: Direction,
    source,
    select_on=None,
    control_topics: tuple | None = None,
    label_rule: str = "any",
    max_length_gap: int | None = None,
    select_split: str = "all",
    heldout_fraction: float = 0.5,
    seed: int = 0,
    n_boot: int = 1000,
    n_random: int = 100,
    batch_size: int = 16,
    label_progress: Callable[[int, int], None] | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> DetectionReport:
    """Label ``source`` (a judged run folder or a paired JSONL), build the topic control, and run
    :func:`detection_report`; with ``select_on`` (same kinds), choose on it and report on ``source``.
    ``control_topics``: two paired files (``path[:split]``) for the control, default
    :func:`default_control_topics`; the report says when there is none."""
    direction.check_fits(pair.n_layers, pair.d_model, "the loaded pair")
    if "finetuned" not in pair.sides:
        raise DetectionError(
            "the loaded pair has no fine-tuned model: labels and prompt-stage projections are taken on the fine-tune"
        )
    prompts, labels = labelled_prompts(pair, source, label_rule, "all", max_length_gap, batch_size, label_progress)
    selection = None
    if select_on is not None:
        selection, select_labels = labelled_prompts(
            pair, select_on, label_rule, select_split, max_length_gap, batch_size, label_progress
        )
    topics = control_topics or default_control_topics(direction, source)
    control = topic_control(pair, *topics, batch_size=batch_size) if topics else None
    report = detection_report(
        pair, prompts, direction, heldout_fraction, seed, n_boot, batch_size, progress, selection, control, n_random
    )
    report.labels = labels
    if select_on is not None:
        report.transfer.update(
            {
                "select_on": str(select_on),
                "select_split": select_split,
                "report_on": str(source),
                "select_labels": select_labels,
            }
        )
    if control is None:
        report.warnings.append(
            "no specificity control: pass two paired files of different topics (--control A B) to build one"
        )
    return report
