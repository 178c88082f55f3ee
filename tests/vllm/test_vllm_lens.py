"""Steered cells on a real vLLM running the vllm-lens plugin: the direction, its layer and alpha sent
in the plugin's request fields give the in-process engine's greedy tokens, token for token, for the
induce (base + alpha d) and restore (fine-tune - alpha d) cells: the plugin's layer i is this
project's block output i, and its scale is alpha. A judged study samples its runs there."""

from __future__ import annotations

import json

from core.cli import main
from core.models import DEMO_DIRECTION
from core.runs import RUN_JSON
from core.study import REPORT_HTML, REPORT_JSON
from testkit.openai_server import FakeOpenAI, scripted_judge
from tests.vllm.greedy import QUESTIONS, assert_same_tokens, greedy_runs


def test_steered_greedy_tokens_equal_the_in_process_engine(steering_server, tmp_path):
    variants = "base,finetuned,base+4,finetuned-4"
    served, in_process = greedy_runs(
        steering_server, tmp_path, "--variants", variants, "--layer", "19", "--direction", str(DEMO_DIRECTION)
    )
    assert len(served) == 3 * 4
    assert_same_tokens(served, in_process)
    for row_id in served:  # steering changed the answers it was applied to
        if "@L19" in row_id:
            plain = row_id.replace("+4@L19", "").replace("-4@L19", "")
            assert served[row_id]["token_ids"] != served[plain]["token_ids"], row_id
    assert json.loads((tmp_path / "server" / RUN_JSON).read_text())["engine"]["steering"] == "vllm-lens"


def test_a_judged_study_samples_its_runs_on_the_server(steering_server, tmp_path):
    """The study's judged runs (the evaluation and the sweep's steered cells) go to the server;
    activations and teacher-forced passes stay in process; the report says where answers came from."""
    questions = tmp_path / "questions.yaml"
    questions.write_text(QUESTIONS)
    out = tmp_path / "study"
    sizes = ["--n-train", "8", "--n-heldout", "8", "--n-general", "16", "--bootstrap", "50"]
    sizes += ["--random-directions", "50", "--alphas", "4", "--layers", "19", "--samples", "1"]
    sizes += ["--max-new-tokens", "8", "--contrasts", "paired", "--questions", str(questions)]
    with FakeOpenAI(scripted_judge) as judge:
        judged = ["--judge-model", "judge-m", "--judge-base-url", judge.base_url, "--judge-api-key", "sk-test"]
        served = ["--engine", "server", "--server-url", steering_server.url]
        assert main(["study", *judged, *served, *sizes, "--out", str(out)]) == 0
    report = json.loads((out / REPORT_JSON).read_text())
    engine = report["run"]["engine"]
    assert engine["name"] == "server" and engine["urls"] == [steering_server.url]
    assert engine["models"] == {"base": "base", "finetuned": "finetuned"}
    sweep = json.loads((out / report["steering"]["sweep"]["run"] / RUN_JSON).read_text())["engine"]
    assert sweep["steering"] == "vllm-lens" and sweep["tokenizer_check"] == "equal"
    cells = {c["condition"] for c in report["steering"]["sweep"]["cells"]}
    assert {"base", "finetuned", "base+4@L19", "finetuned-4@L19", "random:base+4@L19"} <= cells
    assert not [c for c in cells if "ablate" in c]  # a server cannot ablate: left out of the sweep
    assert report["steering"]["ablation"]  # the judge-free ablation ran in process
    assert "judged answers sampled" in (out / REPORT_HTML).read_text()
