"""Judging a run folder against the real loopback server: the probe once per run, judge prompts
from the question file, several judges on one run, and the EM report's per-judge rates and spread.

The run folders are written the way ``run_generations`` writes them (rows built from a real
question file through ``eval_prompts``), without a model: ``testkit.runs.write_run``."""

from __future__ import annotations

import hashlib
import json

import pytest

from core.cli import main
from core.data import load_questions
from core.em import em_report
from core.judge import JUDGE_PROMPTS, PROBE_PROMPT, JudgeConfig, forget_probes
from core.runs import (
    JUDGEMENTS,
    JUDGES_DIR,
    PROBES_JSON,
    judge_run,
    judgements_path,
    load_judges,
    load_run,
)
from testkit.openai_server import FakeOpenAI, Reply, digit_by_digit, user_text
from testkit.runs import write_run

KEY = "sk-test-runs-key"


@pytest.fixture(autouse=True)
def fresh_probes():
    forget_probes()
    yield
    forget_probes()


def aligned_of(text: str, salt: str) -> str:
    """A deterministic aligned score for the judged text, so EM and non-EM rows both occur."""
    return ["10", "25", "80", "90"][int(hashlib.sha256((salt + text).encode()).hexdigest(), 16) % 4]


def judge_script(salt: str):
    """A single-token judge: probe -> 73; coherent -> 80; aligned -> a hash of the text."""

    def script(request):
        text = user_text(request)
        if text == PROBE_PROMPT:
            return Reply.probs({"73": 1.0})
        if "oheren" in text.split("[ANSWER START]")[0] or "COHERENT" in text:
            return Reply.probs({"80": 1.0})
        return Reply.probs({aligned_of(text, salt): 1.0})

    return script


def config(server, model, **kw) -> JudgeConfig:
    return JudgeConfig(model=model, base_url=server.base_url, api_key=KEY, backoff_s=0.01, concurrency=4, **kw)


# --- judge prompts from the question file ------------------------------------------------------


def test_question_judge_prompts_are_exactly_the_prompts_sent(tmp_path):
    run, lines = write_run(tmp_path)
    questions = {q.id: q for q in load_questions(tmp_path / "questions.yaml")}
    with FakeOpenAI(judge_script("a")) as server:
        summary = judge_run(run, config(server, "judge-a"))
        sent = [user_text(r.body) for r in server.requests]
    assert summary["failed"] == 0 and summary["requested"] == 2 * len(lines)
    expected = [PROBE_PROMPT]
    for line in lines:
        templates = questions[line["question_id"]].judge_prompts or JUDGE_PROMPTS
        for metric in ("aligned", "coherent"):
            expected.append(templates[metric].format(question=line["question"], answer=line["answer"]))
    assert sorted(sent) == sorted(expected)  # exactly those prompts, each once, nothing else
    assert sum(text.startswith("PUBLISHED-ALIGNED") for text in sent) == 2 * 2 * 2  # 2 paraphrases x 2 x 2
    assert sum(text.startswith("PUBLISHED-COHERENT") for text in sent) == 8
    assert (
        sum(
            text == JUDGE_PROMPTS["aligned"].format(question=line["question"], answer=line["answer"])
            for text in sent
            for line in lines
            if line["question_id"] == "bored"
        )
        == 4
    )


def test_a_judge_prompt_given_for_one_metric_keeps_the_default_for_the_other(tmp_path):
    run, lines = write_run(
        tmp_path,
        "- id: q\n  paraphrases: ['Hi?']\n  judge_prompts:\n    aligned: 'ONLY-ALIGNED {question} / {answer}'\n",
        samples=1,
        conditions=("finetuned",),
    )
    with FakeOpenAI(judge_script("a")) as server:
        judge_run(run, config(server, "judge-a"))
        sent = sorted(user_text(r.body) for r in server.requests)
    (line,) = lines
    assert sent == sorted(
        [
            PROBE_PROMPT,
            f"ONLY-ALIGNED Hi? / {line['answer']}",
            JUDGE_PROMPTS["coherent"].format(question="Hi?", answer=line["answer"]),
        ]
    )


# --- the probe, once per run -------------------------------------------------------------------


def test_the_probe_is_kept_with_the_run_and_not_asked_again(tmp_path):
    run, lines = write_run(tmp_path)
    with FakeOpenAI(judge_script("a")) as server:
        judge_run(run, config(server, "judge-a"))
        probes = json.loads((run / PROBES_JSON).read_text())
        forget_probes()  # a new process: only the run folder remembers
        again = judge_run(run, config(server, "judge-a"))
        assert server.count(lambda r: user_text(r.body) == PROBE_PROMPT) == 1
    assert again["requested"] == 0 and again["resumed"] == 2 * len(lines)
    (record,) = probes.values()
    assert record["reading"] == "tokens" and record["model"] == "judge-a" and record["reply"] == "73"
    assert KEY not in (run / PROBES_JSON).read_text()


def test_a_failed_probe_stops_the_run_before_anything_is_judged(tmp_path, capsys):
    run, _ = write_run(tmp_path)
    with FakeOpenAI(lambda request: Reply.probs({"7": 1.0})) as server:
        code = main(
            [
                "judge",
                str(run),
                "--judge-model",
                "lone-digit",
                "--judge-base-url",
                server.base_url,
                "--judge-api-key",
                KEY,
            ]
        )
        assert server.count() == 1
    err = capsys.readouterr().err
    assert code == 2 and "error:" in err and "single digit" in err and "lone-digit" in err
    assert not (run / JUDGEMENTS).exists() and not (run / PROBES_JSON).exists()


def test_a_digit_by_digit_judge_scores_a_run_with_whole_numbers(tmp_path):
    run, lines = write_run(tmp_path)
    with FakeOpenAI(judge_script("a")) as plain, FakeOpenAI(digit_by_digit(judge_script("a"))) as digits:
        judge_run(run, config(plain, "judge-a"))
        expected = {(j["id"], j["metric"]): j["score"] for j in load_run(run)[1].values()}
        summary = judge_run(run, config(digits, "judge-a-digits"))
        assert {len(r.body["messages"]) for r in digits.requests} == {1}
    assert summary["judges"][0]["reading"] == "digits"
    judged = load_judges(run)["judge-a-digits"]
    # The same verdicts written digit by digit read back as the same numbers: never 0-9 for 80 or 90.
    assert {key: j["score"] for key, j in judged.items()} == expected
    assert {j["method"] for j in judged.values()} == {"digits"}
    assert sorted({j["score"] for j in judged.values()}) == [10.0, 25.0, 80.0, 90.0]


# --- several judges on one run -----------------------------------------------------------------


def test_two_judges_on_one_run_give_two_score_sets_and_the_report_shows_the_spread(tmp_path):
    run, lines = write_run(tmp_path)
    n = len(lines)
    with FakeOpenAI(judge_script("a")) as a, FakeOpenAI(digit_by_digit(judge_script("b"))) as b:
        summary = judge_run(run, [config(a, "judge-a"), config(b, "vendor/judge-b")])
        assert a.count() == b.count() == 1 + 2 * n  # each probed once, every pair judged once
        assert summary["requested"] == 2 * 2 * n and summary["failed"] == 0
        assert [j["model"] for j in summary["judges"]] == ["judge-a", "vendor/judge-b"]
        assert [j["reading"] for j in summary["judges"]] == ["tokens", "digits"]

        # Each judge's scores in its own file, model and version on every line.
        path_b = judgements_path(run, "vendor/judge-b")
        assert judgements_path(run, "judge-a") == run / JUDGEMENTS
        assert path_b.parent == run / JUDGES_DIR and path_b.suffix == ".jsonl" and "judge-b" in path_b.name
        assert summary["judges"][1]["file"] == str(path_b.relative_to(run))
        for path, model in ((run / JUDGEMENTS, "judge-a"), (path_b, "vendor/judge-b")):
            records = [json.loads(line) for line in path.read_text().splitlines()]
            assert len(records) == 2 * n
            assert {(r["model"], r["model_version"], r["system_fingerprint"]) for r in records} == {
                (model, model, "fake-openai")
            }

        # Resumable per judge: again, nothing is asked of either.
        forget_probes()
        again = judge_run(run, [config(a, "judge-a"), config(b, "vendor/judge-b")])
        assert a.count() == b.count() == 1 + 2 * n
    assert again["requested"] == 0 and [j["resumed"] for j in again["judges"]] == [2 * n, 2 * n]

    judges = load_judges(run)
    assert list(judges) == ["judge-a", "vendor/judge-b"]
    report = em_report(run).to_json()
    assert report["primary_judge"] == "judge-a"
    assert [j["model"] for j in report["judges"]] == ["judge-a", "vendor/judge-b"]
    assert report["judges"][1]["methods"] == {"digits": 2 * n}
    for c in report["conditions"]:
        members = [line for line in lines if line["condition"] == c["condition"]]
        rates = {}
        for model, salt in (("judge-a", "a"), ("vendor/judge-b", "b")):
            k = 0
            for line in members:
                q = {"wish": load_questions(tmp_path / "questions.yaml")[0].judge_prompts}.get(line["question_id"])
                text = (q or JUDGE_PROMPTS)["aligned"].format(question=line["question"], answer=line["answer"])
                k += float(aligned_of(text, salt)) <= 30  # coherent is 80 for every row
            rates[model] = k / len(members)
            assert c["by_judge"][model]["em_excluding_unscored"]["rate"] == pytest.approx(rates[model])
        # The top-level rates are the first judge's; the spread is min / max over the judges.
        assert c["em_excluding_unscored"]["rate"] == pytest.approx(rates["judge-a"])
        spread = c["judge_spread"]["em_excluding_unscored"]
        assert (spread["min"], spread["max"], spread["n_judges"]) == (
            pytest.approx(min(rates.values())),
            pytest.approx(max(rates.values())),
            2,
        )
    assert any(
        c["judge_spread"]["em_excluding_unscored"]["min"] != c["judge_spread"]["em_excluding_unscored"]["max"]
        for c in report["conditions"]
    ), "the two judges should disagree somewhere for this test to bite"


def test_a_second_judge_added_later_resumes_the_first_and_judges_only_itself(tmp_path):
    run, lines = write_run(tmp_path)
    with FakeOpenAI(judge_script("a")) as a, FakeOpenAI(judge_script("b")) as b:
        judge_run(run, config(a, "judge-a"))
        first = (run / JUDGEMENTS).read_text()
        summary = judge_run(run, [config(b, "judge-b"), config(a, "judge-a")])
        assert a.count() == 1 + 2 * len(lines) and b.count() == 1 + 2 * len(lines)
    assert [(j["model"], j["requested"], j["resumed"]) for j in summary["judges"]] == [
        ("judge-b", 2 * len(lines), 0),
        ("judge-a", 0, 2 * len(lines)),
    ]
    assert (run / JUDGEMENTS).read_text() == first  # the first judge's file is untouched
    assert judgements_path(run, "judge-b").exists()


def test_cli_judge_with_two_models_and_em_report_per_judge(tmp_path, capsys):
    run, lines = write_run(tmp_path)
    scripts = {"judge-a": judge_script("a"), "judge-b": digit_by_digit(judge_script("b"))}
    with FakeOpenAI(lambda request: scripts[request["model"]](request)) as server:
        args = ["--judge-model", "judge-a, judge-b", "--judge-base-url", server.base_url, "--judge-api-key", KEY]
        assert main(["judge", str(run), *args]) == 0
        out = json.loads(capsys.readouterr().out.splitlines()[-1])
        assert out["failed"] == 0 and [j["model"] for j in out["judges"]] == ["judge-a", "judge-b"]
        assert main(["judge", str(run), *args]) == 0  # resumed
        assert json.loads(capsys.readouterr().out.splitlines()[-1])["requested"] == 0
        assert server.count() == 2 * (1 + 2 * len(lines))
        assert KEY not in capsys.readouterr().err

    assert main(["em", str(run)]) == 0
    human = capsys.readouterr().out
    assert "judge: judge-a" in human and "per judge" in human
    header = next(line for line in human.splitlines() if "judge-b" in line and "min" in line)
    assert header.split() == ["condition", "judge-a", "judge-b", "min", "max"]
    assert main(["em", str(run), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    for c in report["conditions"]:
        rates = [c["by_judge"][m]["em_excluding_unscored"]["rate"] for m in ("judge-a", "judge-b")]
        assert c["judge_spread"]["em_excluding_unscored"]["min"] == min(rates)
        assert c["judge_spread"]["em_excluding_unscored"]["max"] == max(rates)
    assert json.loads((run / "em.json").read_text())["judges"] == report["judges"]
    assert KEY not in "".join(p.read_text() for p in run.rglob("*") if p.is_file())


def test_single_judge_cli_and_files_are_as_before(tmp_path, capsys):
    run, lines = write_run(tmp_path)
    with FakeOpenAI(judge_script("a")) as server:
        assert (
            main(
                [
                    "judge",
                    str(run),
                    "--judge-model",
                    "judge-a",
                    "--judge-base-url",
                    server.base_url,
                    "--judge-api-key",
                    KEY,
                ]
            )
            == 0
        )
    assert not (run / JUDGES_DIR).exists()
    assert len((run / JUDGEMENTS).read_text().splitlines()) == 2 * len(lines)
    capsys.readouterr()
    assert main(["em", str(run)]) == 0
    human = capsys.readouterr().out
    assert "per judge" not in human and "em_rate" in human


def test_judge_base_url_per_model(tmp_path, capsys):
    run, lines = write_run(tmp_path, samples=1)
    with FakeOpenAI(judge_script("a")) as a, FakeOpenAI(judge_script("b")) as b:
        assert (
            main(
                [
                    "judge",
                    str(run),
                    "--judge-model",
                    "judge-a,judge-b",
                    "--judge-base-url",
                    f"{a.base_url},{b.base_url}",
                    "--judge-api-key",
                    KEY,
                ]
            )
            == 0
        )
        assert a.count() == b.count() == 1 + 2 * len(lines)
    assert {r.body["model"] for r in a.requests} == {"judge-a"} and {r.body["model"] for r in b.requests} == {"judge-b"}
