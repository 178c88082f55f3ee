"""How the judge's numbers and labels are read from log-probs, without a server: labels spread
over several tokens, judges whose tokenizer writes numbers digit by digit. The same readings
through the loopback server, and the probe, are in tests/integration/test_judge_readings.py."""

from __future__ import annotations

import math

import pytest

from core.judge import (
    METHOD_DIGITS,
    METHOD_LOGPROBS,
    READ_DIGITS,
    READ_TOKENS,
    JudgeError,
    label_of,
    read_score,
    score_digits,
    score_top_logprobs,
)


def lp(probs: dict[str, float]) -> list[tuple[str, float]]:
    return [(token, math.log(p)) for token, p in probs.items()]


# --- labels spread over several tokens ----------------------------------------------------------


@pytest.mark.parametrize(
    "reply, label",
    [
        ("REF", "REFUSAL"),
        ("CO", "CODE"),
        ("COD", "CODE"),
        ("Refus", "REFUSAL"),
        (" code", "CODE"),
        ("**REFUSAL**", "REFUSAL"),
        ("REFUSAL.", "REFUSAL"),
        ("CODE\n", "CODE"),
        ("C", None),
        ("R", None),
        ("RESULT", None),
        ("REASON", None),
        ("80", None),
        ("", None),
        ("CO 50", None),
        ("Could", None),
    ],
)
def test_label_of_a_reply(reply, label):
    assert label_of(reply) == label


def test_label_prefix_on_the_first_token_is_read_as_the_label():
    assert score_top_logprobs(lp({"REF": 0.7, "40": 0.3})) == (40.0, pytest.approx(0.3), "REFUSAL")
    assert score_top_logprobs(lp({"CO": 0.9, "5": 0.1})) == (None, pytest.approx(0.1), "CODE")
    # A first token that could start a label but whose reply goes on otherwise is no label.
    assert score_top_logprobs(lp({"RE": 0.6, "40": 0.4}), reply="REASONABLE") == (40.0, pytest.approx(0.4), None)


# --- digit-by-digit judges ------------------------------------------------------------------------


def test_a_digit_judge_below_a_quarter_of_number_mass_is_none():
    top = lp({"7": 0.24, "I": 0.19, "The": 0.19, "It": 0.19, "As": 0.19})
    assert score_digits(top, "70") == (None, pytest.approx(0.24), None)
    assert score_digits(lp({"7": 0.25, "I": 0.75}), "70") == (70.0, pytest.approx(0.25), None)
    assert score_digits(lp({"1": 0.9, "9": 0.1}), "150")[0] is None  # out of range
    assert score_digits(lp({"7": 0.9, "8": 0.1}), "72.5 out of 100")[0] == 72.5


def test_leading_blank_tokens_are_skipped():
    positions = [(" ", lp({" ": 0.9, "7": 0.1})), ("7", lp({"7": 0.8, "6": 0.2})), ("0", lp({"0": 1.0}))]
    assert read_score(" 70", positions, READ_DIGITS) == (70.0, pytest.approx(1.0), None, METHOD_DIGITS)
    single = [(" ", lp({" ": 0.99, "80": 0.01})), ("85", lp({"85": 0.5, "90": 0.5}))]
    assert read_score(" 85", single, READ_TOKENS) == (87.5, pytest.approx(1.0), None, METHOD_LOGPROBS)


def test_digits_read_as_single_tokens_raise_instead_of_scoring_7():
    positions = [("7", lp({"7": 0.6, "8": 0.4})), ("0", lp({"0": 1.0}))]
    with pytest.raises(JudgeError, match="digit by digit.*about 7.*probe"):
        read_score("70", positions, READ_TOKENS)
