"""How the judge's numbers and labels are read, and the probe that settles it, against the real
loopback OpenAI-compatible server (no mocks): labels beside scores, labels spread over several
tokens, judges whose tokenizer writes numbers digit by digit."""

from __future__ import annotations

import re

import pytest

from core.judge import (
    METHOD_DIGITS,
    METHOD_LOGPROBS,
    PROBE_PROMPT,
    READ_DIGITS,
    READ_TEXT,
    READ_TOKENS,
    JudgeConfig,
    JudgeError,
    Probe,
    ProbeError,
    forget_probes,
    judge_answers,
    load_judgements,
    probe_judge,
)
from testkit.openai_server import FakeOpenAI, Reply, digit_by_digit, user_text

KEY = "sk-test-readings-4411"
FAST = dict(max_retries=2, timeout_s=5.0, backoff_s=0.01, concurrency=4)


@pytest.fixture(autouse=True)
def fresh_probes():
    forget_probes()
    yield
    forget_probes()


def rows(*ids: str) -> list[dict[str, str]]:
    return [{"id": i, "question": f"question {i}?", "answer": f"answer-{i} end"} for i in ids]


def row_id(request: dict) -> str | None:
    found = re.search(r"answer-(\w+)", user_text(request))
    return found.group(1) if found else None


def is_probe(request: dict) -> bool:
    return user_text(request) == PROBE_PROMPT


def config(server: FakeOpenAI, model: str = "judge-r", **overrides) -> JudgeConfig:
    return JudgeConfig(**{"model": model, "base_url": server.base_url, "api_key": KEY, **FAST, **overrides})


def by_id(summary) -> dict[str, object]:
    return {j.id: j for j in summary.judgements}


# --- a label beside the score (CODE / REFUSAL drop it only under a quarter of number mass) ------


def test_code_on_top_with_enough_number_mass_keeps_the_score_through_the_server(tmp_path):
    replies = {
        "code": Reply.probs({"CODE": 0.6, "80": 0.3, "90": 0.1}),  # numbers carry 0.4
        "refusal": Reply.probs({"REFUSAL": 0.7, "20": 0.25, "x": 0.05}),  # exactly a quarter: kept
        "thin": Reply.probs({"CODE": 0.8, "70": 0.2}),  # under a quarter: None
        "plain": Reply.probs({"60": 0.9, "REFUSAL": 0.1}),  # the label is not the judge's choice
    }
    with FakeOpenAI(lambda request: replies[row_id(request)]) as server:
        summary = judge_answers(rows(*replies), config(server), tmp_path / "o.jsonl", ["aligned"])
    j = by_id(summary)
    assert (j["code"].score, j["code"].label, j["code"].mass) == (
        pytest.approx((80 * 0.3 + 90 * 0.1) / 0.4),
        "CODE",
        pytest.approx(0.4),
    )
    assert (j["refusal"].score, j["refusal"].label) == (pytest.approx(20.0), "REFUSAL")
    assert (j["thin"].score, j["thin"].label, j["thin"].mass) == (None, "CODE", pytest.approx(0.2))
    assert (j["plain"].score, j["plain"].label) == (pytest.approx(60.0), None)
    assert all(x.method == METHOD_LOGPROBS and x.error is None for x in summary.judgements)
    # What was logged is what was returned: the label sits beside the score in the file.
    assert load_judgements(tmp_path / "o.jsonl")["code", "aligned"].label == "CODE"


# --- labels spread over several tokens ----------------------------------------------------------


def test_multi_token_labels_through_the_server_with_one_token_asked_for(tmp_path):
    # GPT-style tokens: "REFUSAL" is "REF" + "USAL", "CODE" is "CO" + "DE"; one token is asked for,
    # and the server cuts the reply there, as the real API does.
    replies = {
        "r": Reply.sequence([("REF", {"REF": 0.7, "40": 0.2, "50": 0.1}), ("USAL", {"USAL": 1.0})]),
        "c": Reply.sequence([("CO", {"CO": 0.85, "10": 0.15}), ("DE", {"DE": 1.0})]),
    }
    with FakeOpenAI(lambda request: replies[row_id(request)]) as server:
        summary = judge_answers(rows("r", "c"), config(server), tmp_path / "o.jsonl", ["aligned"])
        assert {r.body["max_tokens"] for r in server.requests} == {1}
    j = by_id(summary)
    assert (j["r"].label, j["r"].score, j["r"].mass) == ("REFUSAL", pytest.approx(43.333333), pytest.approx(0.3))
    assert (j["c"].label, j["c"].score) == ("CODE", None)
    assert all(x.completion_tokens == 1 for x in summary.judgements)


def test_multi_token_labels_read_from_the_generated_text_of_a_digit_judge(tmp_path):
    replies = {
        "r": Reply.spelled("REFUSAL", first={"REF": 0.85, "3": 0.1, "2": 0.05}),  # REF USA L
        "c": Reply.spelled("CODE", first={"COD": 0.6, "4": 0.3, "5": 0.1}),  # COD E; numbers 0.4
        "words": Reply.spelled("RE ASON", first={"RE": 0.9, "7": 0.1}),  # starts like REFUSAL, is not
    }

    def script(request):
        return Reply.spelled("73") if is_probe(request) else replies[row_id(request)]

    with FakeOpenAI(script) as server:
        probe = probe_judge(config(server))
        summary = judge_answers(rows(*replies), config(server), tmp_path / "o.jsonl", ["aligned"], reading=probe)
    j = by_id(summary)
    assert probe.reading == READ_DIGITS
    assert (j["r"].label, j["r"].score, j["r"].mass) == ("REFUSAL", None, pytest.approx(0.15))
    # The label is the likeliest reply, but 0.4 of the mass is on digits: the score would stand, yet a
    # digit judge's number is only read from the text it writes, which here is CODE (documented limit).
    assert (j["c"].label, j["c"].score, j["c"].mass) == ("CODE", None, pytest.approx(0.4))
    assert (j["words"].label, j["words"].score) == (None, None)
    assert all(x.method == METHOD_DIGITS for x in summary.judgements)


# --- digit-by-digit judges ------------------------------------------------------------------------


def digit_judge(score_of: dict[str, str], first: dict[str, dict[str, float]] | None = None):
    """A judge whose tokenizer writes numbers digit by digit (Qwen2.5 / Gemma / Mistral / SmolLM2)."""

    def script(request):
        if is_probe(request):
            return Reply.spelled("73", first={"7": 0.95, "8": 0.05})
        i = row_id(request)
        return Reply.spelled(score_of[i], first=(first or {}).get(i))

    return script


def test_a_digit_judge_is_probed_and_its_70_is_read_as_70(tmp_path):
    scores = {"seventy": "70", "hundred": "100", "five": "5", "zero": "0", "split": "20"}
    first = {"seventy": {"7": 0.6, "8": 0.3, "6": 0.1}, "split": {"2": 0.55, "8": 0.45}}
    with FakeOpenAI(digit_judge(scores, first)) as server:
        probe = probe_judge(config(server))
        summary = judge_answers(rows(*scores), config(server), tmp_path / "o.jsonl", ["aligned"], reading=probe)
        judged = [r.body for r in server.requests if not is_probe(r.body)]
    assert probe.reading == READ_DIGITS and probe.number == 73 and probe.tokens[:2] == ("7", "3")
    j = by_id(summary)
    assert j["seventy"].score == 70.0 and j["seventy"].mass == pytest.approx(1.0)
    assert (j["hundred"].score, j["five"].score, j["zero"].score) == (100.0, 5.0, 0.0)
    # The likeliest path, not a mean over numbers: a judge split between 20 and 80 gives 20.
    assert j["split"].score == 20.0
    assert all(x.method == METHOD_DIGITS and x.error is None for x in summary.judgements)
    assert all(body["max_tokens"] >= 4 and body["logprobs"] is True for body in judged)
    assert j["seventy"].completion_tokens == 2 and j["hundred"].completion_tokens == 3


def test_a_digit_judge_never_scores_0_to_9_for_a_70_whatever_it_is_asked(tmp_path):
    """Asked for one token, the digit judge says "7"; the probed reading asks for enough tokens."""
    with FakeOpenAI(digit_judge({"a": "70", "b": "85"})) as server:
        probe = probe_judge(config(server))
        summary = judge_answers(rows("a", "b"), config(server), tmp_path / "o.jsonl", reading=probe)
    scores = [j.score for j in summary.judgements]
    assert scores == [70.0, 70.0, 85.0, 85.0]
    assert not any(s is not None and s < 10 for s in scores)


def test_single_token_scores_logged_for_a_digit_judge_are_requested_again(tmp_path):
    out = tmp_path / "o.jsonl"
    with FakeOpenAI(digit_judge({"a": "70", "b": "40"})) as server:
        # Unprobed, with the published one-token request: the server cuts "70" to "7".
        first = judge_answers(rows("a", "b"), config(server), out, ["aligned"])
        assert all(j.score < 10 for j in first.judgements)  # "7" and "4": the silent bug
        probe = probe_judge(config(server))
        before = server.count()
        second = judge_answers(rows("a", "b"), config(server), out, ["aligned"], reading=probe)
        assert server.count() - before == 2
    assert [j.score for j in second.judgements] == [70.0, 40.0]
    assert (second.n_resumed, second.n_requested) == (0, 2)
    assert {k: j.score for k, j in load_judgements(out).items()} == {("a", "aligned"): 70.0, ("b", "aligned"): 40.0}


# --- the probe ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply, reading, number",
    [
        (Reply.probs({"73": 0.98, "7": 0.02}), READ_TOKENS, 73),  # GPT / Llama 3: one token
        (Reply.probs({"42": 1.0}), READ_TOKENS, 42),  # disobedient, but the tokenizer shows
        (Reply.spelled("73"), READ_DIGITS, 73),  # Qwen2.5 / Gemma / Mistral / SmolLM2
        (Reply.sequence([(" ", {" ": 0.9, "7": 0.1}), ("7", {"7": 1.0}), ("3", {"3": 1.0})]), READ_DIGITS, 73),
        (Reply.text_only("73"), READ_TEXT, 73),  # no log-probs
        (Reply.text_only("The number is 73."), READ_TEXT, 73),
    ],
    ids=["one-token", "other-number", "digits", "leading-space-digits", "text", "text-words"],
)
def test_probe_settles_the_reading(reply, reading, number):
    with FakeOpenAI(lambda request: reply) as server:
        probe = probe_judge(config(server))
        (request,) = server.requests
    assert (probe.reading, probe.number) == (reading, number)
    assert (probe.model, probe.base_url) == ("judge-r", server.base_url)
    body = request.body
    assert user_text(body) == PROBE_PROMPT and "73" in PROBE_PROMPT
    assert body["temperature"] == 0 and body["max_tokens"] >= 4 and body["logprobs"] is True
    assert Probe.from_dict(probe.to_dict()) == probe


@pytest.mark.parametrize(
    "reply, message",
    [
        (Reply.probs({"7": 0.9, "8": 0.1}), r"replied '7'.*single digit and no more.*refused"),
        (Reply.spelled("Sure"), r"replied 'Sure'.*not a number.*refused"),
        (Reply.probs({"REFUSAL": 1.0}), r"not a number"),
        (Reply.text_only("I cannot do that"), r"holds no number.*no log-probs"),
        (Reply.error(500, "overloaded"), r"probe .*failed: HTTP 500: overloaded \(after 3 attempts\)"),
        (Reply.malformed(), r"probe .*failed: malformed response"),
    ],
    ids=["lone-digit", "words", "label", "text-no-number", "server-error", "malformed"],
)
def test_probe_failures_are_clear_errors(reply, message, tmp_path):
    with FakeOpenAI(lambda request: reply) as server:
        with pytest.raises(ProbeError, match=message) as info:
            probe_judge(config(server))
    assert "judge-r" in str(info.value) and server.base_url in str(info.value)
    assert KEY not in str(info.value)


def test_probe_refused_key_is_the_usual_judge_error():
    with FakeOpenAI(lambda request: Reply.error(401, f"bad key {KEY}")) as server:
        with pytest.raises(JudgeError, match="rejected the API key") as info:
            probe_judge(config(server))
    assert not isinstance(info.value, ProbeError) and KEY not in str(info.value)


def test_probe_never_shows_an_echoed_key():
    with FakeOpenAI(lambda request: Reply.probs({"7": 1.0}, text=f"7 {KEY}")) as server:
        with pytest.raises(ProbeError) as info:
            probe_judge(config(server))
    assert KEY not in str(info.value) and "<redacted>" in str(info.value)


def test_probe_is_asked_once_per_model_and_base_url_per_process():
    with (
        FakeOpenAI(lambda request: Reply.probs({"73": 1.0})) as one,
        FakeOpenAI(lambda request: Reply.spelled("73")) as two,
    ):
        assert probe_judge(config(one)).reading == READ_TOKENS
        assert probe_judge(config(one)) is probe_judge(config(one))
        assert one.count() == 1
        probe_judge(config(one, model="judge-other"))
        assert one.count() == 2
        assert probe_judge(config(two)).reading == READ_DIGITS  # same model, another URL
        assert two.count() == 1
        probe_judge(config(one), refresh=True)
        assert one.count() == 3


def test_probe_models_the_version_the_endpoint_reports():
    with FakeOpenAI(lambda request: Reply.probs({"73": 1.0}, model_version="judge-r-2025-01-01")) as server:
        probe = probe_judge(config(server))
    assert probe.model == "judge-r" and probe.model_version == "judge-r-2025-01-01"
    assert probe.system_fingerprint == "fake-openai"


def test_every_judgement_records_the_model_and_the_version_reported(tmp_path):
    with FakeOpenAI(lambda request: Reply.probs({"55": 1.0}, model_version="judge-r-2024-08-06")) as server:
        summary = judge_answers(rows("a"), config(server), tmp_path / "o.jsonl")
    for j in [*summary.judgements, *load_judgements(tmp_path / "o.jsonl").values()]:
        assert (j.model, j.model_version, j.system_fingerprint) == ("judge-r", "judge-r-2024-08-06", "fake-openai")


def test_the_loopback_digit_judge_wrapper_spells_any_script(tmp_path):
    script = digit_by_digit(
        lambda request: (
            Reply.probs({"73": 1.0}) if is_probe(request) else Reply.probs({"60": 0.5, "70": 0.3, "REFUSAL": 0.2})
        )
    )
    with FakeOpenAI(script) as server:
        probe = probe_judge(config(server))
        one = judge_answers(rows("a"), config(server), tmp_path / "one.jsonl", ["aligned"])
        read = judge_answers(rows("a"), config(server), tmp_path / "digits.jsonl", ["aligned"], reading=probe)
    assert probe.reading == READ_DIGITS
    # The same judge read as single tokens sees "6" / "7" / "REF" and would average digits: the bug
    # the probe exists for. Read digit by digit it gives 60.
    assert one.judgements[0].score == pytest.approx((6 * 0.5 + 7 * 0.3) / 0.8)
    assert read.judgements[0].score == 60.0 and read.judgements[0].mass == pytest.approx(0.8)
