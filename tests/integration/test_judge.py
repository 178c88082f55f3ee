"""The log-prob judge against a real OpenAI-compatible HTTP server on loopback (no mocks). The
reading of scores without a server is in tests/unit/test_judge.py."""

from __future__ import annotations

import json
import logging
import re
import threading
import warnings

import pytest

from core.judge import (
    JUDGE_PROMPTS,
    JudgeConfig,
    JudgeError,
    Judgement,
    judge_answers,
    load_judgements,
)
from testkit.openai_server import FakeOpenAI, Reply, user_text

KEY = "sk-test-9f3KzQ-emlens-SECRET-7781"
# A generous timeout: a loaded CI machine must not turn ordinary requests into retries.
FAST = dict(max_retries=3, timeout_s=5.0, backoff_s=0.01, concurrency=4)


def rows(*ids: str) -> list[dict[str, str]]:
    return [{"id": i, "question": f"question {i}?", "answer": f"answer-{i} end"} for i in ids]


def row_id(request: dict) -> str:
    return re.search(r"answer-(\w+)", user_text(request)).group(1)


def metric_of(request: dict) -> str:
    return "aligned" if "REFUSAL" in user_text(request) else "coherent"


def config(server: FakeOpenAI, **overrides) -> JudgeConfig:
    settings = {"model": "judge-x", "base_url": server.base_url, "api_key": KEY, **FAST}
    return JudgeConfig(**{**settings, **overrides})


def by_key(summary) -> dict[tuple[str, str], Judgement]:
    return {(j.id, j.metric): j for j in summary.judgements}


def test_scores_rows_on_both_metrics_with_the_published_request(tmp_path):
    def script(request):
        i, metric = row_id(request), metric_of(request)
        if metric == "aligned":
            probs = {"80": 0.5, "90": 0.3, "hello": 0.2} if i == "a" else {"20": 1.0}
            return Reply.probs(probs, usage=(50, 1))
        return Reply.probs({"60": 0.5, "70": 0.5}, usage=(40, 1))

    with FakeOpenAI(script) as server:
        out = tmp_path / "judged.jsonl"
        summary = judge_answers(rows("a", "b"), config(server), out)

    j = by_key(summary)
    assert [(x.id, x.metric) for x in summary.judgements] == [
        ("a", "aligned"),
        ("a", "coherent"),
        ("b", "aligned"),
        ("b", "coherent"),
    ]
    assert j["a", "aligned"].score == pytest.approx(83.75)
    assert j["a", "aligned"].mass == pytest.approx(0.8)
    assert j["b", "aligned"].score == pytest.approx(20.0)
    assert j["a", "coherent"].score == pytest.approx(65.0)
    for x in summary.judgements:
        assert (x.method, x.error, x.model) == ("logprobs", None, "judge-x")
    assert (summary.n_requested, summary.n_resumed, summary.n_failed, summary.n_calls) == (4, 0, 0, 4)
    assert (summary.prompt_tokens, summary.completion_tokens) == (2 * 50 + 2 * 40, 4)

    assert server.count() == 4 and not server.script_errors
    request = server.requests[0]
    assert request.path == "/v1/chat/completions"
    body = request.body
    assert body["model"] == "judge-x"
    assert body["temperature"] == 0 and body["max_tokens"] == 1
    assert body["logprobs"] is True and body["top_logprobs"] == 20
    texts = {user_text(r.body) for r in server.requests}
    assert JUDGE_PROMPTS["aligned"].format(question="question a?", answer="answer-a end") in texts

    lines = out.read_text().splitlines()
    assert len(lines) == 4
    assert load_judgements(out) == j


def test_only_the_top_20_logprobs_count(tmp_path):
    # 25 candidates: the server returns the 20 most probable, as the API does.
    probs = {str(n): 0.9 / 20 for n in range(20)}
    probs.update({"99": 0.02, "98": 0.02, "97": 0.02, "96": 0.02, "95": 0.02})
    with FakeOpenAI(lambda request: Reply.probs(probs)) as server:
        summary = judge_answers(rows("a"), config(server), tmp_path / "o.jsonl", metrics=["aligned"])
    assert summary.judgements[0].score == pytest.approx(9.5)
    assert summary.judgements[0].mass == pytest.approx(0.9)


def test_code_and_refusal_recorded_through_the_server(tmp_path):
    labels = {"a": {"CODE": 0.9, "10": 0.1}, "b": {"REFUSAL": 0.8, "0": 0.2}}
    with FakeOpenAI(lambda request: Reply.probs(labels[row_id(request)])) as server:
        summary = judge_answers(rows("a", "b"), config(server), tmp_path / "o.jsonl", metrics=["aligned"])
    j = by_key(summary)
    assert (j["a", "aligned"].label, j["a", "aligned"].score) == ("CODE", None)
    assert (j["b", "aligned"].label, j["b", "aligned"].score) == ("REFUSAL", None)
    assert all(x.error is None for x in summary.judgements)


@pytest.mark.parametrize("logprobs_key", [True, False], ids=["logprobs-null", "logprobs-missing"])
def test_text_fallback_when_the_endpoint_returns_no_logprobs(tmp_path, logprobs_key):
    texts = {"a": "73", "b": "REFUSAL", "c": "I cannot rate this"}

    def script(request):
        return Reply.text_only(texts[row_id(request)], logprobs_key=logprobs_key)

    with FakeOpenAI(script) as server:
        summary = judge_answers(rows("a", "b", "c"), config(server), tmp_path / "o.jsonl", ["aligned"])
    j = by_key(summary)
    assert all(x.method == "text" and x.mass is None and x.error is None for x in summary.judgements)
    assert j["a", "aligned"].score == 73.0
    assert (j["b", "aligned"].score, j["b", "aligned"].label) == (None, "REFUSAL")
    assert (j["c", "aligned"].score, j["c", "aligned"].label) == (None, None)
    assert server.count() == 3  # an unparsable text is a result, not a failure to retry


@pytest.mark.parametrize("status", [429, 500, 503])
def test_retries_transient_http_errors_then_succeeds(tmp_path, status):
    failures = {"n": 0}
    lock = threading.Lock()

    def script(request):
        if row_id(request) == "flaky":
            with lock:
                failures["n"] += 1
                if failures["n"] <= 2:
                    return Reply.error(status)
        return Reply.probs({"55": 1.0})

    with FakeOpenAI(script) as server:
        summary = judge_answers(rows("ok", "flaky"), config(server), tmp_path / "o.jsonl", ["aligned"])
    assert server.count_containing("answer-flaky") == 3
    assert server.count_containing("answer-ok") == 1
    assert by_key(summary)["flaky", "aligned"].score == pytest.approx(55.0)
    assert summary.n_failed == 0 and summary.n_calls == 4


def test_retries_exhausted_records_an_error_and_the_run_completes(tmp_path):
    def script(request):
        return Reply.error(429, "slow down") if row_id(request) == "bad" else Reply.probs({"90": 1.0})

    with FakeOpenAI(script) as server:
        summary = judge_answers(rows("a", "bad", "c"), config(server, max_retries=2), tmp_path / "o.jsonl")
    j = by_key(summary)
    bad = j["bad", "aligned"]
    assert bad.score is None and bad.method is None
    assert bad.error == "HTTP 429: slow down (after 3 attempts)"
    assert server.count_containing("answer-bad") == 2 * 3  # two metrics, three attempts each
    assert summary.n_failed == 2
    assert j["a", "aligned"].score == 90.0 and j["c", "coherent"].score == 90.0


def test_client_errors_are_recorded_without_retry(tmp_path):
    def script(request):
        return Reply.error(400, "context too long") if row_id(request) == "long" else Reply.probs({"90": 1.0})

    with FakeOpenAI(script) as server:
        summary = judge_answers(rows("a", "long"), config(server), tmp_path / "o.jsonl", metrics=["aligned"])
    assert server.count_containing("answer-long") == 1
    assert by_key(summary)["long", "aligned"].error == "HTTP 400: context too long (after 1 attempt)"


def test_timeout_is_retried_then_recorded_and_the_rest_completes(tmp_path):
    def script(request):
        if row_id(request) == "slow":
            return Reply.probs({"10": 1.0}, delay_s=1.0)
        return Reply.probs({"90": 1.0})

    with FakeOpenAI(script) as server:
        summary = judge_answers(
            rows("a", "slow", "b"),
            config(server, max_retries=1, timeout_s=0.3),
            tmp_path / "o.jsonl",
            metrics=["aligned"],
        )
    j = by_key(summary)
    assert j["slow", "aligned"].error == "timed out after 0.3 s (after 2 attempts)"
    assert j["slow", "aligned"].score is None
    assert server.count_containing("answer-slow") == 2
    assert j["a", "aligned"].score == 90.0 and j["b", "aligned"].score == 90.0


@pytest.mark.parametrize(
    "reply, reason",
    [
        (Reply.malformed(), "body is not valid JSON"),
        (Reply.malformed(b'{"id": "x", "object": "chat.completion"}'), "no choices"),
        (Reply.malformed(b'{"id": "x", "choices": []}'), "no choices"),
        (Reply.malformed(b"<html>bad gateway</html>", content_type="text/html"), "missing 'choices'"),
    ],
    ids=["truncated-json", "no-choices-key", "empty-choices", "html"],
)
def test_malformed_responses_are_retried_then_recorded(tmp_path, reply, reason):
    def script(request):
        return reply if row_id(request) == "bad" else Reply.probs({"90": 1.0})

    with FakeOpenAI(script) as server:
        summary = judge_answers(
            rows("a", "bad"), config(server, max_retries=2), tmp_path / "o.jsonl", metrics=["aligned"]
        )
    bad = by_key(summary)["bad", "aligned"]
    assert bad.error == f"malformed response: {reason} (after 3 attempts)"
    assert server.count_containing("answer-bad") == 3
    assert by_key(summary)["a", "aligned"].score == 90.0


def test_malformed_once_then_valid_succeeds(tmp_path):
    calls = {"n": 0}

    def script(request):
        calls["n"] += 1
        return Reply.malformed() if calls["n"] == 1 else Reply.probs({"33": 1.0})

    with FakeOpenAI(script) as server:
        summary = judge_answers(rows("a"), config(server), tmp_path / "o.jsonl", metrics=["aligned"])
    assert summary.judgements[0].score == pytest.approx(33.0)
    assert server.count() == 2


# --- resume ------------------------------------------------------------------------------


def test_rerun_on_the_same_log_makes_no_new_requests(tmp_path):
    out = tmp_path / "o.jsonl"

    def script(request):
        return Reply.probs({"80": 0.5, "90": 0.5} if metric_of(request) == "aligned" else {"40": 1.0})

    with FakeOpenAI(script) as server:
        first = judge_answers(rows("a", "b", "c"), config(server), out)
        assert server.count() == 6
        done = []
        record = lambda d, t: done.append((d, t))  # noqa: E731
        second = judge_answers(rows("a", "b", "c"), config(server), out, progress=record)
        assert server.count() == 6
    assert second.judgements == first.judgements
    assert (second.n_requested, second.n_resumed, second.n_calls, second.prompt_tokens) == (0, 6, 0, 0)
    assert done == [(6, 6)]
    assert len(out.read_text().splitlines()) == 6


def test_rerun_retries_only_errored_rows(tmp_path):
    out = tmp_path / "o.jsonl"
    healthy = {"on": False}

    def script(request):
        if row_id(request) == "b" and not healthy["on"]:
            return Reply.error(500)
        return Reply.probs({"70": 1.0})

    with FakeOpenAI(script) as server:
        first = judge_answers(rows("a", "b"), config(server, max_retries=1), out, metrics=["aligned"])
        assert by_key(first)["b", "aligned"].error is not None
        assert server.count() == 1 + 2
        healthy["on"] = True
        second = judge_answers(rows("a", "b"), config(server, max_retries=1), out, metrics=["aligned"])
        assert server.count() == 3 + 1
    assert (second.n_requested, second.n_resumed, second.n_failed) == (1, 1, 0)
    assert by_key(second)["b", "aligned"].score == 70.0
    assert load_judgements(out)["b", "aligned"].error is None


def test_truncated_last_line_is_tolerated_and_rejudged(tmp_path):
    out = tmp_path / "o.jsonl"
    with FakeOpenAI(lambda request: Reply.probs({"60": 1.0})) as server:
        judge_answers(rows("a", "b", "c"), config(server), out, metrics=["aligned"])
        data = out.read_bytes()
        out.write_bytes(data[:-15])  # the run was killed in the middle of the last line
        torn_id = json.loads(data.splitlines()[-1])["id"]

        with pytest.warns(UserWarning, match=re.escape(f"{out}:3: skipping unreadable judgement line")):
            summary = judge_answers(rows("a", "b", "c"), config(server), out, metrics=["aligned"])
        assert server.count() == 3 + 1
        assert server.count_containing(f"answer-{torn_id}") == 2
    assert (summary.n_requested, summary.n_resumed) == (1, 2)
    assert all(j.score == 60.0 for j in summary.judgements)
    # The torn tail was cut away, so the log now reads cleanly.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(load_judgements(out)) == 3
    assert len(out.read_text().splitlines()) == 3


def test_resuming_with_another_judge_model_is_refused(tmp_path):
    out = tmp_path / "o.jsonl"
    with FakeOpenAI(lambda request: Reply.probs({"60": 1.0})) as server:
        judge_answers(rows("a"), config(server), out, metrics=["aligned"])
        with pytest.raises(ValueError, match="judge-x.*judge-y"):
            judge_answers(rows("a"), config(server, model="judge-y"), out, metrics=["aligned"])


# --- the API key ---------------------------------------------------------------------------


def test_api_key_reaches_the_server_and_nothing_else(tmp_path, caplog, capsys):
    caplog.set_level(logging.DEBUG)
    for name in ("openai", "httpx", "httpx2", "httpcore", "httpcore2"):
        caplog.set_level(logging.DEBUG, logger=name)

    def script(request):
        i = row_id(request)
        if i == "e":
            return Reply.error(500, f"upstream echoed {KEY}")  # a careless server
        if i == "t":
            return Reply.probs({"1": 1.0}, delay_s=1.0)
        return Reply.probs({"90": 1.0})

    out = tmp_path / "o.jsonl"
    with FakeOpenAI(script) as server:
        cfg = config(server, max_retries=1, timeout_s=0.3)
        summary = judge_answers(rows("a", "e", "t"), cfg, out)

    assert server.requests and all(r.headers.get("authorization") == f"Bearer {KEY}" for r in server.requests)
    assert KEY not in out.read_text()
    errors = [j.error for j in summary.judgements if j.error]
    assert len(errors) == 4 and all(KEY not in e for e in errors)
    assert any("<redacted>" in e for e in errors)
    assert caplog.records, "the DEBUG loggers should have captured something"
    assert KEY not in caplog.text
    captured = capsys.readouterr()
    assert KEY not in captured.out and KEY not in captured.err
    assert KEY not in repr(cfg) and KEY not in str(cfg)
    assert KEY not in repr(summary)


def test_api_key_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "env-key-123")
    with FakeOpenAI(lambda request: Reply.probs({"5": 1.0})) as server:
        judge_answers(rows("a"), config(server, api_key=None), tmp_path / "o.jsonl", metrics=["aligned"])
    assert server.requests[0].headers["authorization"] == "Bearer env-key-123"


def test_rejected_key_stops_the_run_without_showing_the_key(tmp_path):
    with FakeOpenAI(lambda request: Reply.error(401, f"Incorrect API key provided: {KEY}")) as server:
        with pytest.raises(JudgeError) as info:
            judge_answers(rows("a", "b"), config(server, concurrency=1), tmp_path / "o.jsonl")
    message = str(info.value)
    assert "HTTP 401" in message and "OPENAI_API_KEY" in message
    assert KEY not in message and KEY not in repr(info.value)
    assert server.count() == 1  # queued rows were dropped, not sent with a bad key


def test_unknown_model_stops_the_run_keeping_what_was_judged(tmp_path):
    out = tmp_path / "o.jsonl"

    def script(request):
        if row_id(request) == "a":
            return Reply.probs({"50": 1.0})
        return Reply.error(404, "model judge-x does not exist")

    with FakeOpenAI(script) as server:
        with pytest.raises(JudgeError, match="HTTP 404: model judge-x does not exist"):
            judge_answers(rows("a", "b"), config(server, concurrency=1), out, metrics=["aligned"])
    assert list(load_judgements(out)) == [("a", "aligned")]


# --- concurrency, prompts, validation -----------------------------------------------------------


def test_concurrency_is_bounded(tmp_path):
    with FakeOpenAI(lambda request: Reply.probs({"50": 1.0}, delay_s=0.05)) as server:
        summary = judge_answers(
            rows(*[f"r{i}" for i in range(16)]),
            config(server, concurrency=4),
            tmp_path / "o.jsonl",
            ["aligned"],
        )
    assert summary.n_failed == 0 and server.count() == 16
    assert 1 < server.max_in_flight <= 4


def test_progress_reports_every_pair(tmp_path):
    seen = []
    with FakeOpenAI(lambda request: Reply.probs({"50": 1.0})) as server:
        out = tmp_path / "o.jsonl"
        judge_answers(rows("a", "b", "c"), config(server), out, progress=lambda *a: seen.append(a))
    assert seen == [(i, 6) for i in range(7)]


def test_custom_prompts_per_metric(tmp_path):
    prompts = {
        "aligned": "Rate Q={question} A={answer}. Number only, or REFUSAL.",
        "coherent": "C: {question} / {answer}",
    }
    with FakeOpenAI(lambda request: Reply.probs({"50": 1.0})) as server:
        judge_answers(rows("a"), config(server), tmp_path / "o.jsonl", prompts=prompts)
    texts = [user_text(r.body) for r in server.requests]
    assert sorted(texts) == sorted(
        ["Rate Q=question a? A=answer-a end. Number only, or REFUSAL.", "C: question a? / answer-a end"]
    )


def test_answers_with_braces_are_passed_verbatim(tmp_path):
    data = [{"id": 7, "question": "q {x}?", "answer": "answer-z {answer} {0}"}]
    with FakeOpenAI(lambda request: Reply.probs({"50": 1.0})) as server:
        summary = judge_answers(data, config(server), tmp_path / "o.jsonl", metrics=["coherent"])
    assert "answer-z {answer} {0}" in user_text(server.requests[0].body)
    assert summary.judgements[0].id == "7"
