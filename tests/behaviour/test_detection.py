"""Early detection end to end on the real default pair, through the command line: the shipped direction,
judge-free labels from the fine-tuning shift, every predictor, the random-direction null, the topic
control and transfer from finance prompts to general ones, in the documented report format. Sized to
24 general prompts of 24 different themes (12 groups a half) and 16 held-out finance prompts."""

from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from core.cli import main
from core.data import load_paired_jsonl
from core.models import DEMO_DIRECTION
from core.organism import FINANCE, GENERAL
from core.preference import log_odds
from core.stats import auroc

DOCUMENTED = {"split_unit", "n_groups", "warnings", "per_layer", "chosen", "predictors", "random_null", "labels"}
DOCUMENTED |= {"transfer", "roc", "prompts"}
PREDICTORS = {"last_token", "prompt_mean", "prompt_max", "finetuning_shift", "base_last_token", "probe"}
PREDICTORS |= {"unrelated_direction", "prompt_length", "base_log_odds", "answer_length_gap"}


def _subset(source, out, records) -> str:
    by_id = {json.loads(line)["id"]: line for line in source.read_text().splitlines()}
    out.write_text("".join(by_id[r.id] + "\n" for r in records))
    return str(out)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("detect-default")
    general, themes = [], set()
    for record in load_paired_jsonl(GENERAL):
        if record.extra["theme"] not in themes and len(general) < 24:
            themes.add(record.extra["theme"])
            general.append(record)
    finance = load_paired_jsonl(FINANCE, "heldout")[:16]
    return {
        "general": _subset(GENERAL, root / "general.jsonl", general),
        "finance": _subset(FINANCE, root / "finance.jsonl", finance),
        "cache": str(root / "cache"),
    }


@pytest.fixture(scope="module")
def report(files):
    argv = ["detect", "--base", "default", "--finetuned", "default", "--cache-dir", files["cache"]]
    argv += ["--direction", str(DEMO_DIRECTION), "--paired", files["general"], "--select-on", files["finance"]]
    argv += ["--control", files["general"], files["finance"], "--random-directions", "50", "--bootstrap", "200"]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):  # computed once for the tests below (capsys is per test)
        assert main([*argv, "--json"]) == 0
    return json.loads(printed.getvalue())


def test_detect_on_the_default_pair_writes_every_documented_key(report):
    assert DOCUMENTED <= set(report) and report["split_unit"] == "group"
    assert set(report["predictors"]) == PREDICTORS
    for entry in report["predictors"].values():
        assert 0 <= entry["ci95"][0] <= entry["auroc"] <= entry["ci95"][1] <= 1
    null = report["random_null"]
    assert null["n"] == 50 and 0 <= null["percentile"] <= 100
    assert null["quantiles"]["2.5"] <= null["quantiles"]["50"] <= null["quantiles"]["97.5"]
    assert report["control"]["method"] == "topic-control"
    assert len(report["per_layer"]) == 30 and report["per_layer_set"] == "selection"


def test_transfer_selects_on_finance_and_reports_on_24_general_themes(report, files):
    transfer = report["transfer"]
    assert transfer["select_on"] == files["finance"] and transfer["report_on"] == files["general"]
    assert transfer["n_select"] == 16 and transfer["n_report"] == 24 == report["chosen"]["n_report"]
    assert report["n_groups"] == {"selection": 16, "report": 24}
    assert not any("useful precision" in w for w in report["warnings"])  # at least 10 groups a half


def test_labels_are_the_fine_tuning_shift_recomputed_on_the_real_pair(report, files, smol_pair):
    records = load_paired_jsonl(files["general"])
    shift = log_odds(smol_pair, "finetuned", records) - log_odds(smol_pair, "base", records)
    rows = {r["id"]: r for r in report["prompts"] if r["split"] == "report"}
    assert np.allclose([rows[r.id]["score"] for r in records], shift, atol=1e-3)
    labels = [rows[r.id]["misaligned"] for r in records]
    assert 0 < sum(labels) < len(labels)  # both classes, else no AUROC
    risk = [rows[r.id]["risk"] for r in records]
    assert report["chosen"]["report_auroc"] == pytest.approx(auroc(risk, labels))
    assert report["predictors"]["last_token"]["auroc"] == report["chosen"]["report_auroc"]
