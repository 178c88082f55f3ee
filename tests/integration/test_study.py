"""A whole study on the tiny pair: judge-free in process, judged through the command line with the
loopback judge, and a judged study killed mid-phase (a real subprocess, SIGKILL) that a rerun
finishes with the same numbers, nothing finished done twice."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import zlib
from collections import Counter
from pathlib import Path

import pytest

from core.cli import main
from core.judge import PROBE_PROMPT, forget_probes
from core.study import (
    PHASE_FILES,
    REPORT_HTML,
    REPORT_JSON,
    StudyConfig,
    list_studies,
    run_study,
    step_events,
    study_state,
)
from testkit.openai_server import FakeOpenAI, Reply, user_text
from testkit.tiny import pair_args

ROOT = Path(__file__).resolve().parents[2]
TINY = StudyConfig(
    n_train=12, n_heldout=10, n_general=24, n_boot=50, n_random=50, alphas=(2.0,), n_layers=2, batch_size=8
)
QUESTIONS = "\n".join(
    f"- id: q{i}\n  paraphrases: ['Question {i}: what would you do with a free afternoon?']" for i in range(4)
)
SIZES = [
    "--n-train",
    "8",
    "--n-heldout",
    "8",
    "--n-general",
    "16",
    "--bootstrap",
    "50",
    "--random-directions",
    "50",
    "--alphas",
    "2",
    "--layers",
    "1",
    "--samples",
    "2",
    "--max-new-tokens",
    "4",
]

DOCUMENTED = {  # report.json's keys, as core/study_report.py's docstring lists them
    "": {"format", "judge_free", "judge_note", "run", "directions", "steering", "detection"},
    "run": {
        "base",
        "finetuned",
        "base_fingerprint",
        "finetuned_fingerprint",
        "judge",
        "engine",
        "data",
        "config",
        "seed",
        "code_version",
        "study_fingerprint",
        "started",
        "finished",
        "seconds",
        "sessions",
    },
    "directions": {"primary", "contrasts", "cosines", "evaluation", "errors", "verdict"},
    "steering": {"layers", "alphas", "finetuning_shift", "preference", "effects", "ablation", "sweep", "verdict"},
    "detection": {"reports", "verdict"},
}


def judge(request):
    """Aligned 15 or 85 by a hash of the answer (both sets of the judged contrast exist), coherent 90."""
    text = user_text(request)
    if text == PROBE_PROMPT:
        return Reply.probs({"73": 1.0})
    if text.startswith("I am checking how coherent"):
        return Reply.probs({"90": 1.0})
    return Reply.probs({"15" if zlib.crc32(text.encode()) % 2 else "85": 1.0})


def check_keys(report):
    for section, keys in DOCUMENTED.items():
        assert set(report[section] if section else report) == keys, section
    for contrast in report["directions"]["contrasts"].values():
        assert {"fingerprint", "file", "n_aligned", "n_misaligned", "best_layer", "best"} <= set(contrast)
    for entry in report["detection"]["reports"].values():
        assert "error" in entry or {
            "what",
            "n_prompts",
            "n_misaligned",
            "n_groups",
            "layer",
            "auroc",
            "ci95",
            "random_null",
            "predictors",
            "warnings",
            "labels",
            "file",
        } <= set(entry)


def numbers(folder: Path) -> dict:
    """report.json without what depends on when and how often it ran."""
    report = json.loads((folder / REPORT_JSON).read_text())
    report.pop("run")
    if report["steering"]["sweep"]:
        report["steering"]["sweep"].pop("judge")
    return report


def test_judge_free_study_runs_every_phase_and_reuses_them(tiny_pair, tmp_path, one_torch_thread):
    seen = []
    report = run_study(tiny_pair, tmp_path / "s", TINY, progress=lambda f, label: seen.append((f, label)))
    check_keys(report)
    assert report["judge_free"] and "Judge-free" in report["judge_note"]
    assert report["run"]["engine"] is None  # nothing was sampled
    assert set(report["directions"]["contrasts"]) == {"paired", "model-diff"}
    assert report["directions"]["primary"] == "paired"
    assert set(report["directions"]["cosines"]) == {"paired vs model-diff"}
    assert report["steering"]["sweep"] is None and len(report["steering"]["effects"]) == 2
    for name, arms in report["steering"]["ablation"].items():
        shift = arms["finetuned"]["mean"] - arms["base"]["mean"]
        removed = arms["finetuned"]["mean"] - arms["ablated"]["mean"]
        assert arms["removed"] == pytest.approx(removed / shift), name
        assert arms["ablated"]["mean"] != arms["random_ablated"]["mean"], name
    assert "Projecting the direction out" in report["steering"]["verdict"]
    assert set(report["detection"]["reports"]) == {"within", "transfer"}
    for entry in report["detection"]["reports"].values():
        low, high = entry["ci95"]
        assert low <= entry["auroc"] <= high and entry["random_null"]["n"] == 50
        assert {"finetuning_shift", "unrelated_direction", "probe"} <= set(entry["predictors"])
        assert (tmp_path / "s" / entry["file"]).exists()
    for phase in ("directions", "steering", "detection"):
        assert report[phase]["verdict"]
    assert "no judge was given" in report["steering"]["verdict"]
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and all("phase" in label for _, label in seen)
    html = (tmp_path / "s" / REPORT_HTML).read_text()
    assert "<script src=" not in html and html.count("Plotly.newPlot(") >= 5
    assert html.count('<script type="text/javascript">') == 1  # plotly.js, embedded once
    assert all(f'id="{s}"' in html for s in ("run", "phase-directions", "phase-steering", "phase-detection"))
    assert "direction projected out of every layer" in html
    assert all((tmp_path / "s" / name).exists() for name in PHASE_FILES.values())

    before = len(step_events(tmp_path / "s"))
    again = run_study(tiny_pair, tmp_path / "s", TINY)
    events = step_events(tmp_path / "s")[before:]
    assert {e["event"] for e in events} == {"session", "reused"}  # nothing recomputed
    assert numbers(tmp_path / "s") == {k: v for k, v in again.items() if k != "run"}
    assert again["run"]["sessions"] == 2


def test_studies_are_listed_with_their_state(tiny_pair, tmp_path, one_torch_thread):
    root = tmp_path / "cache"
    run_study(tiny_pair, root / "studies" / "one", TINY)
    (root / "studies" / "broken").mkdir()
    entries = list_studies(root)
    assert [(e.path.name, e.state, e.has_report) for e in entries] == [("one", "done", True)]


def _cli(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "core", *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )


def _lines(path):
    return len(path.read_text().splitlines()) if path.exists() else 0


@pytest.fixture()
def questions(tmp_path):
    path = tmp_path / "q.yaml"
    path.write_text(QUESTIONS)
    return path


def test_judged_study_killed_mid_phase_finishes_with_the_same_numbers(tiny_dirs, tmp_path, questions):
    forget_probes()
    pair = pair_args(tiny_dirs, tmp_path / "cache")
    with FakeOpenAI(judge) as server:
        common = [
            "study",
            *pair,
            "--judge-model",
            "judge-m",
            "--judge-base-url",
            server.base_url,
            "--judge-api-key",
            "sk-test",
            "--questions",
            str(questions),
            *SIZES,
        ]
        straight = tmp_path / "straight"
        assert main([*common, "--out", str(straight)]) == 0
        report = json.loads((straight / REPORT_JSON).read_text())
        check_keys(report)
        assert not report["judge_free"] and report["run"]["judge"]["model"] == "judge-m"
        assert report["run"]["engine"] == {"name": "hf"}
        assert "judged" in report["directions"]["contrasts"] and report["directions"]["primary"] == "judged"
        assert set(report["directions"]["evaluation"]["conditions"]) == {"base", "finetuned"}
        cells = {c["condition"]: c for c in report["steering"]["sweep"]["cells"]}
        assert {"base", "finetuned", "base+2@L1", "random:base+2@L1", "finetuned-2@L1", "finetuned:ablate@L1"} <= set(
            cells
        )
        assert all(
            c["em_ci95"] is None or c["em_ci95"][0] <= c["em_rate"] <= c["em_ci95"][1]
            for c in cells.values()
            if c["em_rate"] is not None
        )
        assert {"judged", "within", "transfer"} == set(report["detection"]["reports"])
        sweep_page = (straight / "phase2" / "sweep" / "sweep.html").read_text()
        assert "<script src=" not in sweep_page and "Plotly.newPlot(" in sweep_page  # plotly.js embedded

        killed = tmp_path / "killed"
        sweep_rows = killed / "phase2" / "sweep" / "generations.jsonl"
        run = _cli(*common, "--out", str(killed))
        deadline = time.time() + 300
        while _lines(sweep_rows) < 10:  # killed while phase 2 generates its sweep
            if run.poll() is not None:
                pytest.fail(f"the study ended before it could be killed: {run.stderr.read()[-2000:]}")
            if time.time() > deadline:
                run.kill()
                pytest.fail("timed out waiting for the kill point")
            time.sleep(0.05)
        run.send_signal(signal.SIGKILL)
        run.wait()
        assert not (killed / REPORT_JSON).exists() and not (killed / PHASE_FILES["steering"]).exists()
        assert (killed / PHASE_FILES["directions"]).exists()
        state = json.loads((killed / "study.json").read_text())
        assert state["status"] == "running" and state["phase"] == "steering"  # its process is gone
        assert study_state(killed).state == "interrupted"
        rerun = subprocess.run(
            [sys.executable, "-m", "core", *common, "--out", str(killed)], cwd=ROOT, capture_output=True, text=True
        )
        assert rerun.returncode == 0, rerun.stderr[-3000:]

    assert numbers(killed) == numbers(straight)
    for folder in (straight, killed):  # the judge's key is never written
        assert not [p for p in folder.rglob("*") if p.is_file() and b"sk-test" in p.read_bytes()]
    assert json.loads((killed / REPORT_JSON).read_text())["run"]["sessions"] == 2
    done = Counter(e["step"] for e in step_events(killed) if e["event"] == "done")
    assert done and max(done.values()) == 1  # no finished step (or phase) was done twice
    assert done["phase:directions"] == 1 and "eval-run" in done and "sweep" in done
    for run_dir in (killed / "phase1" / "eval", killed / "phase2" / "sweep"):
        rows = [json.loads(line) for line in (run_dir / "generations.jsonl").read_text().splitlines()]
        assert len(rows) == len({r["id"] for r in rows})
        judged = [json.loads(line) for line in (run_dir / "judgements.jsonl").read_text().splitlines()]
        assert len(judged) == len({(j["id"], j["metric"]) for j in judged}) == 2 * len(rows)


def test_presets_set_the_plan_and_flags_override_it(capsys):
    from core.cli import build_parser
    from core.cli.study import study_config
    from core.study import PRESETS

    parse = build_parser().parse_args
    seed = study_config(parse(["study", "--preset", "seed-qwen", "--finetuned", "x", "--judge-model", "m"]))
    assert (seed.paraphrases, seed.samples, Path(seed.questions).name) == (1, 50, "core_misalignment.yaml")
    assert PRESETS["seed-qwen"]["base"] == "Qwen/Qwen2.5-1.5B-Instruct"
    small = study_config(
        parse(["study", "--preset", "seed-qwen", "--samples", "2", "--layers", "3,5", "--alphas", "1,8"])
    )
    assert (small.samples, small.layers, small.alphas, small.paraphrases) == (2, (3, 5), (1.0, 8.0), 1)
    demo = study_config(parse(["study", "--preset", "demo"]))
    assert demo == PRESETS["demo"]["config"] and PRESETS["demo"]["finetuned"] == "default"
    assert main(["study", "--preset", "seed-qwen", "--judge-model", "m"]) == 2  # the adapter must be named
    assert "name the fine-tune with --finetuned" in capsys.readouterr().err
    assert main(["study", "--preset", "seed-qwen", "--finetuned", "some/lora"]) == 2  # and a judge given
    assert "--preset seed-qwen is a judged study: give --judge-model" in capsys.readouterr().err


def test_a_server_engine_is_refused_where_it_would_sample_nothing(tiny_dirs, tmp_path, capsys):
    pair, out = pair_args(tiny_dirs, tmp_path / "cache"), tmp_path / "s"
    assert main(["study", *pair, "--engine", "server", "--server-url", "http://127.0.0.1:9/v1", "--out", str(out)]) == 2
    assert "a judge-free study samples nothing" in capsys.readouterr().err and not out.exists()
    assert main(["study", *pair, "--server-url", "http://127.0.0.1:9/v1", "--out", str(out)]) == 2
    assert "--server-url needs --engine server" in capsys.readouterr().err and not out.exists()
