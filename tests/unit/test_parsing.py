"""The one rule for typed lists (core.parsing): the forms it accepts and the messages it gives,
shared by the command line and the dashboard's forms."""

from __future__ import annotations

import pytest

from core.errors import EMLensError, InputError, user_message
from core.parsing import ParseError, parse_assignments, parse_layers, parse_names, parse_numbers


@pytest.mark.parametrize(
    "text, cast, expected",
    [
        ("1,2,4", float, [1.0, 2.0, 4.0]),
        (" 1, 2 ,4 ", float, [1.0, 2.0, 4.0]),
        ("-8;0.5", float, [-8.0, 0.5]),
        ("1e-1", float, [0.1]),
        ("10,15,20", int, [10, 15, 20]),
        ("7", int, [7]),
        ("", float, []),
        (" , ", int, []),
    ],
)
def test_number_lists(text, cast, expected):
    values = parse_numbers(text, "--alphas", cast)
    assert values == expected and all(type(v) is cast for v in values)


@pytest.mark.parametrize(
    "text, cast, message",
    [
        ("1,x", float, "--alphas '1,x': 'x' is not a number; expected comma-separated numbers, e.g. 1,2,4"),
        (
            "10,1.5",
            int,
            "--alphas '10,1.5': '1.5' is not a whole number; expected comma-separated whole numbers, e.g. 10,15",
        ),
        (
            "10-12",
            int,
            "--alphas '10-12': '10-12' is not a whole number; expected comma-separated whole numbers, e.g. 10,15",
        ),
    ],
)
def test_malformed_number_lists_name_the_flag(text, cast, message):
    with pytest.raises(ParseError) as caught:
        parse_numbers(text, "--alphas", cast)
    assert str(caught.value) == message
    assert isinstance(caught.value, InputError) and isinstance(caught.value, ValueError)  # old callers still catch it
    assert user_message(caught.value) == message  # the CLI and the dashboard show it as one line


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2", [2]),
        ("0", [0]),
        ("1-3", [1, 2, 3]),
        ("3-3", [3]),
        ("all", [0, 1, 2, 3]),
    ],
)
def test_layers(text, expected):
    assert parse_layers(text, 4) == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("x", "--layer 'x': expected a layer number, a range like 10-14, or all"),
        ("-1", "--layer '-1': expected a layer number, a range like 10-14, or all"),
        ("1,2", "--layer '1,2': expected a layer number, a range like 10-14, or all"),
        ("4", "--layer 4: out of range; this model has layers 0..3"),
        ("2-9", "--layer 2-9: out of range; this model has layers 0..3"),
        ("3-1", "--layer 3-1: out of range; this model has layers 0..3"),
    ],
)
def test_bad_layers(text, message):
    with pytest.raises(ParseError) as caught:
        parse_layers(text, 4)
    assert str(caught.value) == message and isinstance(caught.value, EMLensError)


def test_the_field_name_is_the_callers():
    with pytest.raises(
        ParseError, match=r"^layers 'a': 'a' is not a whole number; expected comma-separated whole numbers"
    ):
        parse_numbers("a", "layers", int)
    with pytest.raises(ParseError, match=r"^steering layer 9: out of range"):
        parse_layers("9", 4, what="steering layer")


def test_names_and_assignments():
    assert parse_names(" gpt-4o, judge-b;;", "--judge-model") == ["gpt-4o", "judge-b"]
    assert parse_names(None, "--judge-model") == []
    with pytest.raises(ParseError, match=r"^--judge-model 'a,b,a': 'a' is named twice$"):
        parse_names("a,b,a", "--judge-model")
    assert parse_assignments([" finetuned = em ", "base=qwen"], "--server-model", "finetuned=em") == {
        "finetuned": "em",
        "base": "qwen",
    }
    with pytest.raises(ParseError, match=r"^--server-model 'finetuned': expected KEY=VALUE, e.g. finetuned=em$"):
        parse_assignments(["finetuned"], "--server-model", "finetuned=em")
    with pytest.raises(ParseError, match=r"^--server-model: finetuned is given twice$"):
        parse_assignments(["finetuned=a", "finetuned=b"], "--server-model", "finetuned=em")


def test_numbers_read_a_typographic_minus():
    assert parse_numbers("−4, 2", "α list") == [-4.0, 2.0]
