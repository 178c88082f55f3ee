"""Prompt-stage projections: how far a prompt already leans along the direction, before any answer.

The read position is the last token of the prompt rendered with the model's own chat
template and generation prompt. One forward pass per side records every layer there; the
activations are cached per (side fingerprint, rendered prompt), so switching directions or
revisiting a prompt costs only dot products.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from core.cache import Cache, make_key
from core.chat import Messages, encode_prompt, render_prompt
from core.directions import Direction, random_like
from core.hooks import capture, last_token


def last_token_activations(pair, side: str, prompts: Sequence[Messages], batch_size: int = 16,
                           progress: Callable[[int, int], None] | None = None) -> torch.Tensor:
    """Block outputs at the last prompt token: ``[n_prompts, n_layers, d_model]`` float32 on the CPU."""
    encoded = [encode_prompt(pair.tokenizer, p) for p in prompts]
    for ids in encoded:
        if len(ids) > pair.max_length:
            raise ValueError(f"a prompt of {len(ids)} tokens exceeds the model's context of {pair.max_length}")
    out = torch.zeros(len(prompts), pair.n_layers, pair.d_model)
    pad = pair.tokenizer.pad_token_id
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start:start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for r, row in enumerate(chunk):  # left padding: the last column is every prompt's last token
            ids[r, width - len(row):] = torch.tensor(row)
            attention[r, width - len(row):] = 1
        positions = (attention.cumsum(-1) - 1).clamp_min(0)
        with pair.side(side) as model, capture(pair.layers(side), reduce=last_token) as records, torch.no_grad():
            model(input_ids=ids.to(pair.device), attention_mask=attention.to(pair.device),
                  position_ids=positions.to(pair.device), use_cache=False, logits_to_keep=1)
        out[start:start + len(chunk)] = torch.stack([records[i][0].float().cpu() for i in range(pair.n_layers)], 1)
        if progress:
            progress(start + len(chunk), len(encoded))
    return out


def cached_last_token_activations(pair, side: str, messages: Messages, cache: Cache | None) -> torch.Tensor:
    """``[n_layers, d_model]`` for one prompt, from the cache when it was computed before."""
    if cache is None:
        return last_token_activations(pair, side, [messages])[0]
    key = make_key("prompt-activations", model=pair.fingerprint(side),
                   prompt=render_prompt(pair.tokenizer, messages))
    return cache.tensors(key, lambda: {"h": last_token_activations(pair, side, [messages])[0]})["h"]


def project(activations: torch.Tensor, direction: Direction) -> np.ndarray:
    """Projection of ``[..., n_layers, d_model]`` activations on the unit direction of each layer."""
    return (activations.float() * direction.unit()).sum(-1).numpy()


def prompt_projections(pair, messages: Messages, direction: Direction, cache: Cache | None = None) -> dict:
    """Raw and calibrated prompt-stage projections at every layer, for each side of the pair."""
    direction.check_fits(pair.n_layers, pair.d_model)
    result: dict = {"layers": list(range(pair.n_layers))}
    for side in pair.sides:
        raw = project(cached_last_token_activations(pair, side, messages, cache), direction)
        calibrated = direction.calibrate(raw)
        result[side] = raw.tolist()
        result[f"{side}_calibrated"] = None if calibrated is None else [
            None if np.isnan(v) else float(v) for v in calibrated]
    return result


# ---------------------------------------------------------------- early-detection statistics

def _auroc_with_ci(scores: np.ndarray, labels: np.ndarray, seed: int, n_boot: int) -> dict:
    from core.stats import auroc, bootstrap_ci

    value = auroc(scores, labels)
    low, high = bootstrap_ci(auroc, scores, labels, n_boot=n_boot, seed=seed, stratify=labels)
    return {"auroc": float(value), "ci95": [float(low), float(high)]}


def detection_report(pair, prompts: Sequence[dict], direction: Direction, heldout_fraction: float = 0.5,
                     seed: int = 0, n_boot: int = 1000, batch_size: int = 16,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """Does the prompt-stage projection predict misalignment before any token is generated?

    ``prompts``: dicts with ``id``, ``messages``, a binary ``label`` (misaligned or not) and an
    optional continuous ``score`` (EM rate, preference log-odds). Per layer: AUROC with a
    stratified bootstrap interval and Spearman against the score. The layer is chosen on a
    seeded, stratified selection half and reported on the other half, next to baselines
    computed on that same half: a norm-matched random direction, the base model's projection,
    a cross-validated logistic probe on the fine-tuned model's activations at that layer,
    and prompt length.
    """
    from core.stats import choose_layer_and_report, logistic_probe_cv, roc_curve, spearman

    direction.check_fits(pair.n_layers, pair.d_model)
    messages = [p["messages"] for p in prompts]
    labels = np.array([bool(p["label"]) for p in prompts])
    if labels.all() or not labels.any():
        raise ValueError(f"detection needs both classes; all {len(labels)} prompts are labelled "
                         f"{'misaligned' if labels.all() else 'aligned'}")
    finetuned = last_token_activations(pair, "finetuned", messages, batch_size, progress)
    base = last_token_activations(pair, "base", messages, batch_size)
    projection = project(finetuned, direction)  # [n, n_layers]
    base_projection = project(base, direction)
    random_projection = project(finetuned, random_like(direction, seed))
    lengths = np.array([len(encode_prompt(pair.tokenizer, m)) for m in messages], dtype=float)
    continuous = np.array([p["score"] for p in prompts], dtype=float) if all(
        p.get("score") is not None for p in prompts) else None

    per_layer = []
    for layer in range(pair.n_layers):
        row = {"layer": layer, **_auroc_with_ci(projection[:, layer], labels, seed, n_boot)}
        row["spearman"] = float(spearman(projection[:, layer], continuous)) if continuous is not None else None
        per_layer.append(row)
    chosen = choose_layer_and_report(projection.T, labels, heldout_fraction, seed, n_boot=n_boot)
    layer, report_idx = chosen["layer"], np.array(chosen["report_idx"])
    y = labels[report_idx]
    probe = logistic_probe_cv(finetuned[:, layer].numpy(), labels, folds=min(5, int(labels.sum()),
                                                                             int((~labels).sum())), seed=seed)
    baselines = {
        "random_direction": _auroc_with_ci(random_projection[report_idx, layer], y, seed, n_boot),
        "base_model_projection": _auroc_with_ci(base_projection[report_idx, layer], y, seed, n_boot),
        "logistic_probe_cv": _auroc_with_ci(probe[report_idx], y, seed, n_boot),
        "prompt_length": _auroc_with_ci(lengths[report_idx], y, seed, n_boot),
    }
    fpr, tpr, _ = roc_curve(projection[report_idx, layer], y)
    calibrated = direction.calibrate(projection)
    reported = set(report_idx.tolist())
    table = []
    for i, p in enumerate(prompts):
        table.append({"id": p["id"], "prompt": p["messages"][-1]["content"], "label": bool(labels[i]),
                      "score": None if continuous is None else float(continuous[i]),
                      "risk": float(projection[i, layer]),
                      "risk_calibrated": None if calibrated is None else float(calibrated[i, layer]),
                      "split": "report" if i in reported else "selection",
                      "answers": p.get("answers", [])})
    table.sort(key=lambda r: r["risk"], reverse=True)
    return {
        "n_prompts": len(prompts), "n_misaligned": int(labels.sum()), "per_layer": per_layer,
        "chosen": {k: chosen[k] for k in ("layer", "selection_auroc", "report_auroc", "report_ci",
                                          "n_select", "n_report", "selection_aurocs")},
        "baselines": baselines, "roc": {"fpr": fpr.tolist(), "tpr": tpr.tolist(), "layer": layer},
        "prompts": table, "direction": direction.provenance,
        "protocol": "layer chosen by AUROC on a seeded stratified selection half; AUROC, ROC and baselines "
                    "reported on the other half with stratified bootstrap 95% intervals",
    }


def labels_from_run(run_dir, rule: str = "any") -> list[dict]:
    """Per prompt of an evaluation run: EM rate of its judged fine-tuned samples, and a binary label."""
    from core.evaluate import load_run, scored_rows

    if rule not in ("any", "majority"):
        raise ValueError(f"label rule {rule!r}: expected any or majority")
    generations, judgements = load_run(run_dir)
    grouped: dict[tuple, list[dict]] = {}
    for r in scored_rows(generations, judgements):
        if r["condition"] == "finetuned" and r["em"] is not None:
            grouped.setdefault((r["question_id"], r["paraphrase"]), []).append(r)
    if not grouped:
        raise ValueError(f"{run_dir}: no judged samples of the unsteered fine-tuned model")
    prompts = []
    for (qid, paraphrase), rows in grouped.items():
        rate = sum(r["em"] for r in rows) / len(rows)
        prompts.append({"id": f"{qid}/{paraphrase}", "messages": rows[0]["messages"], "score": rate,
                        "label": rate > 0 if rule == "any" else rate > 0.5,
                        "answers": [{"answer": r["answer"], "aligned": r["aligned"], "coherent": r["coherent"]}
                                    for r in rows]})
    return prompts


def labels_from_preference(pair, records, batch_size: int = 16,
                           progress: Callable[[int, int], None] | None = None) -> tuple[list[dict], str]:
    """Judge-free labels: the fine-tuned model's preference log-odds for the harmful answer.

    Misaligned = it prefers the harmful answer (log-odds > 0); if that leaves one class empty,
    the prompts above the median log-odds are labelled misaligned instead (the rule is returned)."""
    from core.preference import log_odds

    values = log_odds(pair, "finetuned", records, batch_size, progress)
    rule = "log-odds > 0"
    labels = values > 0
    if labels.all() or not labels.any():
        rule, labels = "log-odds above the median", values > np.median(values)
    return [{"id": r.id, "messages": r.messages, "score": float(v), "label": bool(b),
             "answers": [{"answer": r.misaligned, "kind": "harmful"}, {"answer": r.aligned, "kind": "sound"}]}
            for r, v, b in zip(records, values, labels)], rule


# ---------------------------------------------------------------- cached reports (CLI `detect` and the dashboard)

REPORT_KEYS = ("n_prompts", "per_layer", "chosen", "baselines", "roc", "prompts")


def reports_dir(cache_root) -> Path:
    """Where `python -m core detect` and the dashboard keep detection reports."""
    return Path(cache_root) / "detect"


def report_path(cache_root, source, direction: Direction) -> Path:
    """``<cache>/detect/<source stem>-<direction fingerprint>.json``, the CLI's default name."""
    return reports_dir(cache_root) / f"{Path(source).stem}-{direction.fingerprint}.json"


def list_reports(cache_root) -> list[Path]:
    """Detection report files under the cache, newest first (unreadable ones included: loading says why)."""
    found = [p for p in reports_dir(cache_root).glob("*.json") if p.is_file()]
    return sorted(found, key=lambda p: (p.stat().st_mtime, p.name), reverse=True)


def load_report(path) -> dict:
    """A detection report; ValueError naming the file and the problem when it is missing or unreadable."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"detection report {path} does not exist")
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"detection report {path}: cannot be read: {err}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"detection report {path}: invalid JSON at line {err.lineno}, column {err.colno} "
                         f"({err.msg}; the file is cut off?)") from None
    if not isinstance(report, dict):
        raise ValueError(f"detection report {path}: expected a JSON object, got {type(report).__name__}")
    missing = [k for k in REPORT_KEYS if k not in report]
    if missing:
        raise ValueError(f"detection report {path}: missing {', '.join(missing)}; "
                         "not a report written by `python -m core detect`?")
    shape = {"per_layer": ("layer", "auroc"), "prompts": ("prompt", "label", "risk")}
    for key, fields in shape.items():
        rows = report[key]
        if not isinstance(rows, list) or not all(isinstance(r, dict) and all(f in r for f in fields) for r in rows):
            raise ValueError(f"detection report {path}: {key}: expected a list of objects with {', '.join(fields)}")
    for key, fields in {"chosen": ("layer", "report_auroc"), "roc": ("fpr", "tpr"), "baselines": ()}.items():
        if not isinstance(report[key], dict) or any(f not in report[key] for f in fields):
            raise ValueError(f"detection report {path}: {key}: expected an object"
                             + (f" with {', '.join(fields)}" if fields else ""))
    if not all(isinstance(b, dict) and "auroc" in b for b in report["baselines"].values()):
        raise ValueError(f"detection report {path}: baselines: expected an auroc per baseline")
    return report


def save_report(report: dict, path) -> Path:
    """Write a report atomically (a reader never sees half a file)."""
    from core.cache import atomic_write

    path = Path(path)
    atomic_write(path, json.dumps(report, indent=2, default=str).encode())
    return path


def detect_paired_file(pair, path, direction: Direction, heldout_fraction: float = 0.5, seed: int = 0,
                       n_boot: int = 1000, batch_size: int = 16,
                       label_progress: Callable[[int, int], None] | None = None,
                       progress: Callable[[int, int], None] | None = None) -> dict:
    """Early detection with judge-free labels: the fine-tuned model's preference log-odds on a paired
    JSONL label each prompt, then :func:`detection_report`. The report records the label source and rule."""
    from core.data import load_paired_jsonl

    direction.check_fits(pair.n_layers, pair.d_model, "the loaded pair")
    if "finetuned" not in pair.sides:
        raise ValueError("the loaded pair has no fine-tuned model: preference labels and prompt-stage "
                         "projections are taken on the fine-tune")
    if not str(path).strip() or not Path(path).is_file():
        raise ValueError(f"paired file {str(path)!r}: no such file (a paired JSONL: id, messages, aligned, misaligned)")
    records = load_paired_jsonl(path)
    prompts, rule = labels_from_preference(pair, records, batch_size, label_progress)
    report = detection_report(pair, prompts, direction, heldout_fraction, seed, n_boot, batch_size, progress)
    report["labels"] = {"source": str(path), "rule": rule}
    return report
