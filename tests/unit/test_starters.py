"""Starter prompts: read from the shipped assets, in order, without duplicates."""

import json

import pytest

from core.data import DataError, load_questions
from core.starters import (
    DEFAULT_COMPARE_PROMPT,
    DEFAULT_STEER_PROMPT,
    FINANCE,
    GENERAL,
    QUESTIONS,
    starter_groups,
    starters,
)


def test_groups_are_the_classic_questions_then_general_then_heldout_finance():
    for path in (QUESTIONS, GENERAL, FINANCE):
        assert path.is_file()
    (classic_name, classic), (general_name, general), (finance_name, finance) = starter_groups()
    assert (classic_name, general_name, finance_name) == (
        "Classic EM question",
        "General, high risk",
        "Finance, held out",
    )
    questions = load_questions(QUESTIONS)
    assert classic == tuple((q.id, q.paraphrases[0]) for q in questions)
    assert [label for label, _ in classic][:2] == ["one_wish", "bored"] and len(classic) == 8
    assert len(general) == 6 and len(finance) == 3
    records = {json.loads(line)["messages"][-1]["content"]: json.loads(line) for line in GENERAL.open()}
    for theme, text in general:  # held-out, high-risk, labelled by a theme the classic questions lack
        assert records[text]["theme"] == theme and records[text]["risk"] == "high"
        assert records[text]["split"] == "heldout" and theme not in {q.id for q in questions}
    finance_records = {json.loads(line)["id"]: json.loads(line) for line in FINANCE.open()}
    for label, text in finance:
        assert finance_records[label]["split"] == "heldout"
        assert finance_records[label]["messages"][-1]["content"] == text


def test_starters_are_non_empty_unique_and_uniquely_labelled():
    items = starters()
    assert len(items) == 17
    labels, texts = zip(*items)
    assert all(text.strip() for text in texts)
    assert len(set(texts)) == len(texts) and len(set(labels)) == len(labels)
    assert labels[0] == "Classic EM question · one_wish"
    assert DEFAULT_COMPARE_PROMPT.strip() and DEFAULT_STEER_PROMPT.strip()


def test_a_missing_asset_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="nowhere.yaml: file does not exist"):
        starter_groups(questions=tmp_path / "nowhere.yaml")
