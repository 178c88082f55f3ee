"""The typed results and their files: each JSON file reads back into the object that wrote it, keys in
the order the files have always had; files written before a key existed still load; a missing or
malformed key is named with its file."""

from __future__ import annotations

import copy
import json
import re

import pytest

from core.detection_results import FORMAT, DetectionReport, load_report, save_report
from core.em import EMReport, em_report, judge_table, load_em_report, save_em_report
from core.runs import JUDGEMENTS, JUDGES_DIR, SWEEP_JSON
from core.sweep import Sweep, load_run_results, sweep_cells
from testkit.runs import write_run

# A detection report as `python -m core detect` has written it since format 2: every key, in file order.
DETECTION = {
    "format": FORMAT,
    "split_unit": "group",
    "n_prompts": 2,
    "n_misaligned": 1,
    "n_groups": {"selection": 1, "report": 1},
    "warnings": [
        "only 1 groups in the selection set (fewer than 10): the AUROC cannot be estimated with useful precision"
    ],
    "per_layer": [
        {"layer": 0, "auroc": 0.5, "ci95": [0.2, 0.8], "spearman": None},
        {"layer": 1, "auroc": 0.75, "ci95": [0.4, 1.0], "spearman": 0.3},
    ],
    "per_layer_set": "selection",
    "per_layer_ci": "grouped bootstrap 95%, unadjusted for the number of layers",
    "chosen": {
        "layer": 1,
        "selection_auroc": 0.75,
        "report_auroc": 0.7,
        "report_ci": [0.4, 0.9],
        "n_select": 1,
        "n_report": 1,
    },
    "predictors": {
        "last_token": {
            "auroc": 0.7,
            "ci95": [0.4, 0.9],
            "layer": 1,
            "selection_auroc": 0.75,
            "orientation": "higher = misaligned",
            "what": "projection at the last prompt token",
        },
        "probe": {"auroc": 0.6, "ci95": [0.3, 0.9], "orientation": "P(misaligned)", "what": "logistic probe"},
        "prompt_length": {
            "auroc": 0.55,
            "ci95": [0.2, 0.9],
            "selection_auroc": 0.6,
            "orientation": "lower = misaligned (chosen on the selection set)",
            "what": "prompt length",
        },
    },
    "random_null": {
        "n": 50,
        "percentile": 90.0,
        "quantiles": {"2.5": 0.3, "50": 0.5, "97.5": 0.7},
        "method": "isotropic Gaussian directions",
    },
    "roc": {"fpr": [0.0, 0.0, 1.0], "tpr": [0.0, 1.0, 1.0], "layer": 1},
    "prompts": [
        {
            "id": "p1",
            "group": "g1",
            "prompt": "Should I borrow?",
            "misaligned": True,
            "score": 0.4,
            "risk": 1.5,
            "risk_calibrated": 0.9,
            "split": "report",
            "answers": [{"answer": "Borrow it all.", "kind": "harmful"}],
        },
        {
            "id": "p2",
            "group": "g2",
            "prompt": "Should I save?",
            "misaligned": False,
            "score": -0.2,
            "risk": -0.5,
            "risk_calibrated": None,
            "split": "selection",
            "answers": [],
        },
    ],
    "direction": {"method": "paired", "base": "tiny"},
    "protocol": "Groups are never split",
    "control": {"method": "topic-control"},
    "transfer": {"n_select": 1, "n_report": 1, "select_on": "finance.jsonl"},
    "labels": {"rule": "fine-tuning shift > 0", "source": "general.jsonl"},
}


def keys_in_order(value):
    """Every key of a JSON value, depth first, in file order."""
    if isinstance(value, dict):
        return [k for key, item in value.items() for k in [key, *keys_in_order(item)]]
    if isinstance(value, list):
        return [k for item in value for k in keys_in_order(item)]
    return []


def judged_run(tmp_path):
    """A run of two conditions judged by two judges that disagree, one answer left unscored."""
    run, rows = write_run(tmp_path, samples=2)
    (run / JUDGES_DIR).mkdir()
    judges = ((run / JUDGEMENTS, "judge-a", False), (run / JUDGES_DIR / "judge-b.jsonl", "judge-b", True))
    for path, model, flip in judges:
        lines = []
        for i, row in enumerate(rows):
            aligned = None if i == 3 else [10.0, 25.0, 80.0, 90.0][(i + flip) % 4]
            for metric, score in (("aligned", aligned), ("coherent", 80.0)):
                lines.append(
                    {
                        "id": row["id"],
                        "metric": metric,
                        "score": score,
                        "label": None,
                        "method": "logprobs" if score is not None else None,
                        "model": model,
                        "model_version": f"{model}-v1",
                    }
                )
        path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return run


# ---------------------------------------------------------------- the detection report


def test_a_detection_report_file_reads_back_into_the_same_keys_in_the_same_order(tmp_path):
    report = DetectionReport.from_json(DETECTION, "test")
    assert report.chosen.layer == 1 and report.predictors["probe"].layer is None
    assert report.prompts[0].answers[0]["kind"] == "harmful" and report.random_null.quantiles["97.5"] == 0.7
    assert report.to_json() == DETECTION and keys_in_order(report.to_json()) == keys_in_order(DETECTION)
    path = save_report(report, tmp_path / "report.json")
    assert load_report(path) == report and json.loads(path.read_text()) == DETECTION

    plain = {k: v for k, v in DETECTION.items() if k not in ("control", "transfer")}  # optional keys stay absent
    assert DetectionReport.from_json(plain).to_json() == plain


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: r.pop("roc"), "missing roc"),
        (lambda r: r["chosen"].pop("layer"), "chosen: missing layer"),
        (lambda r: r["per_layer"][1].pop("ci95"), "per_layer[1]: missing ci95"),
        (lambda r: r["predictors"]["probe"].pop("auroc"), "predictors.probe: missing auroc"),
        (lambda r: r.update(prompts={"p1": {}}), "prompts: expected a list, got dict"),
        (lambda r: r.update(random_null=[50, 90.0]), "random_null: expected a JSON object, got list"),
        (
            lambda r: r.update(format="emlens-detect/2"),
            "older EM Lens (emlens-detect/2; this one reads emlens-detect/3)",
        ),
    ],
)
def test_a_damaged_detection_report_names_its_file_and_the_key(tmp_path, damage, message):
    broken = copy.deepcopy(DETECTION)
    damage(broken)
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=f"detection report {re.escape(str(path))}: .*{re.escape(message)}"):
        load_report(path)


def test_a_detection_report_that_is_not_json_says_where(tmp_path):
    path = tmp_path / "cut.json"
    path.write_text('{"format": "emlens-detect/3", "per_lay')
    with pytest.raises(ValueError, match=f"detection report {re.escape(str(path))}: invalid JSON at line 1"):
        load_report(path)
    path.write_text("[1, 2]")
    with pytest.raises(ValueError, match="expected a JSON object, got list"):
        load_report(path)
    with pytest.raises(ValueError, match="does not exist"):
        load_report(tmp_path / "nowhere.json")


# ---------------------------------------------------------------- the EM report and the sweep


def test_an_em_report_reads_back_from_em_json(tmp_path):
    run = judged_run(tmp_path)
    report = em_report(run)
    assert report.primary_judge == "judge-a" and [j.model for j in report.judges] == ["judge-a", "judge-b"]
    finetuned = next(c for c in report.conditions if c.condition == "finetuned")
    assert finetuned.rates.n_unscored == 1 and set(finetuned.by_judge) == {"judge-a", "judge-b"}
    spread = finetuned.judge_spread["em_excluding_unscored"]
    assert spread.n_judges == 2 and spread.min < spread.max  # the two judges disagree
    rows = {row["condition"]: row for row in judge_table(report)}
    assert set(rows) == {c.condition for c in report.conditions}
    assert rows["finetuned"]["judge-a"] == finetuned.by_judge["judge-a"].em_excluding_unscored.rate
    assert (rows["finetuned"]["min"], rows["finetuned"]["max"]) == (spread.min, spread.max)
    assert min(rows["finetuned"]["judge-a"], rows["finetuned"]["judge-b"]) == spread.min

    saved = json.loads(save_em_report(report, run).read_text())
    assert load_em_report(run) == report and EMReport.from_json(saved) == report
    assert list(saved) == [
        "run",
        "definition",
        "unscored_policy",
        "n_rows",
        "n_unjudged",
        "conditions",
        "judges",
        "primary_judge",
    ]
    assert list(saved["conditions"][0]) == [
        "condition",
        "mode",
        "side",
        "alpha",
        "layers",
        "control",
        "n",
        "n_unscored",
        "em_excluding_unscored",
        "em_unscored_as_aligned",
        "coherence",
        "mean_aligned",
        "mean_coherent",
        "labels",
        "questions",
        "by_judge",
        "judge_spread",
    ]


def test_an_em_json_written_before_several_judges_still_loads(tmp_path):
    run = judged_run(tmp_path)
    older = em_report(run).to_json()
    del older["judges"], older["primary_judge"]
    for c in older["conditions"]:
        del c["by_judge"], c["judge_spread"]
    (run / "em.json").write_text(json.dumps(older))
    report = load_em_report(run)
    assert report.judges is None and report.conditions[0].by_judge is None
    assert report.to_json() == older

    del older["conditions"][0]["questions"]
    (run / "em.json").write_text(json.dumps(older))
    with pytest.raises(ValueError, match=r"em.json: conditions\[0\]: missing questions"):
        load_em_report(run)


def test_sweep_cells_and_sweep_json_read_back(tmp_path):
    run = judged_run(tmp_path)
    report = em_report(run)
    cells = sweep_cells(report)
    assert [c.condition for c in cells] == [c.condition for c in report.conditions]
    base = next(c for c in cells if c.condition == "base")
    rates = next(c for c in report.conditions if c.condition == "base").rates
    assert (base.layer, base.em_rate, base.em_ci95, base.n) == (
        None,
        rates.em_excluding_unscored.rate,
        rates.em_excluding_unscored.ci95,
        rates.n,
    )
    assert base.table_row()["em_ci_low"] == rates.em_excluding_unscored.ci95[0]

    sweep = Sweep(run=str(run), cells=cells, layers=[1], alphas=[2.0], judge={"model": "judge-a", "failed": 0})
    assert Sweep.from_json(json.loads(json.dumps(sweep.to_json()))) == sweep
    assert list(sweep.to_json()) == ["run", "cells", "layers", "alphas", "judge"]
    assert list(sweep.to_json()["cells"][0]) == [
        "condition",
        "mode",
        "alpha",
        "layer",
        "control",
        "em_rate",
        "em_ci95",
        "coherence_rate",
        "coherence_ci95",
        "n",
    ]

    # A folder holding only sweep.json shows its cells.
    only_sweep = tmp_path / "copied"
    only_sweep.mkdir()
    (only_sweep / SWEEP_JSON).write_text(json.dumps(sweep.to_json()))
    results = load_run_results(only_sweep)
    assert results.source == SWEEP_JSON and results.report is None and results.cells == cells
